"""Planning a sample's learns: chunking rules, auto-learn units, names, keys."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streamtrain.config import LayerConfig
from streamtrain.hierarchy import chunk_symbols, learn_units, plan_sample, step_key
from streamtrain.patterns import pattern_name


def test_chunks_cut_at_chunk_size():
    """Chunks hold chunk_size symbols, in order."""
    assert chunk_symbols(list("abcdefgh"), 3) == [list("abc"), list("def"), list("gh")]


def test_trailing_single_symbol_joins_previous_chunk():
    """A last chunk of one symbol could make no pattern: it joins the chunk before."""
    assert chunk_symbols(list("abcdefg"), 3) == [list("abc"), list("defg")]


def test_single_symbol_level_learns_nothing():
    """One symbol in all: nothing to learn, and no symbol is invented."""
    assert chunk_symbols(["a"], 8) == []
    assert chunk_symbols([], 8) == []


@given(st.lists(st.sampled_from(list("abcdef")), max_size=60), st.integers(2, 9))
def test_chunking_keeps_every_symbol_in_order(symbols, size):
    """Chunking neither loses, repeats nor reorders symbols (except a lone symbol, which cannot be learned)."""
    chunks = chunk_symbols(symbols, size)
    flat = [s for c in chunks for s in c]
    assert flat == (symbols if len(symbols) != 1 else [])
    assert all(2 <= len(c) <= size + 1 for c in chunks)


def test_units_without_auto_learn_are_whole_chunks():
    """max_pattern_length 0: one unit per chunk, one event per symbol."""
    assert learn_units(["b", "a", "c"], LayerConfig()) == [[["b"], ["a"], ["c"]]]


def test_units_clear_mode_match_kato_auto_learn():
    """CLEAR with mpl=3 on 7 events: learn every 3, then the remaining one is too short to store."""
    layer = LayerConfig(chunk_size=8, max_pattern_length=3)
    units = learn_units(list("abcdefg"), layer)
    assert units == [[["a"], ["b"], ["c"]], [["d"], ["e"], ["f"]]]


def test_units_rolling_mode_match_kato_auto_learn():
    """ROLLING mpl=3 (kato-api.md §5.3): [x][y][z] -> learn xyz keep yz; [w] -> learn yzw keep zw; end -> learn zw."""
    layer = LayerConfig(chunk_size=8, max_pattern_length=3, stm_mode="ROLLING")
    units = learn_units(list("xyzw"), layer)
    assert units == [[["x"], ["y"], ["z"]], [["y"], ["z"], ["w"]], [["z"], ["w"]]]


def test_plan_feeds_level_names_upwards():
    """Level 1's symbols are level 0's names, in order; steps are numbered in sending order."""
    layers = [LayerConfig(chunk_size=2), LayerConfig(chunk_size=2)]
    steps = plan_sample(list("abcd"), layers)
    level0 = [s for s in steps if s.level == 0]
    level1 = [s for s in steps if s.level == 1]
    assert [s.events for s in level0] == [[["a"], ["b"]], [["c"], ["d"]]]
    assert level1[0].events == [[level0[0].name], [level0[1].name]]
    assert [s.index for s in steps] == list(range(len(steps)))
    assert all(s.name == pattern_name(s.events) for s in steps)


def test_plan_stops_where_a_level_has_one_name():
    """Three levels, but level 1 produces a single name: level 2 gets nothing."""
    layers = [LayerConfig(chunk_size=4), LayerConfig(chunk_size=4), LayerConfig(chunk_size=4)]
    steps = plan_sample(list("abcd"), layers)
    assert {s.level for s in steps} == {0}


def test_step_keys_are_deterministic_and_distinct():
    """Same step, same key; a different sample, node or step gets another key."""
    steps = plan_sample(list("abcdef"), [LayerConfig(chunk_size=2)])
    k = step_key("run", "run-L0", 5, steps[0])
    assert k == step_key("run", "run-L0", 5, steps[0])
    others = {step_key("run", "run-L0", 6, steps[0]), step_key("run", "run-L1", 5, steps[0]),
              step_key("run", "run-L0", 5, steps[1]), step_key("run2", "run-L0", 5, steps[0])}
    assert k not in others and len(others) == 4
