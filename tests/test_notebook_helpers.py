"""streamtrain.notebook's tables and plots, on TrainResults as train() returns them."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

from streamtrain import notebook as nb
from streamtrain.trainer import ProgressPoint, TrainResult


def result(start: int, final: int, done_before: int, points: list[tuple[float, int, int, int]], **kw) -> TrainResult:
    last = points[-1]
    fields = dict(
        run_name="r", reason="end", resumed=start > 0, start_position=start, final_position=final,
        samples_trained=last[2], samples_filtered=0, samples_failed=0, tokens=last[3], patterns_learned=[last[2]],
        new_samples=last[2] - done_before, new_tokens=last[3] - done_before * 10, elapsed_seconds=last[0],
        samples_per_second=0.0, tokens_per_second=0.0, num_workers=1, checkpoints_written=1, last_checkpoint=None,
        server_url="http://127.0.0.1:1", server_idempotency=True, failures=[],
        history=[ProgressPoint(elapsed_seconds=e, position=p, samples_trained=s, tokens=t) for e, p, s, t in points],
    )
    fields.update(kw)
    return TrainResult(**fields)


FIRST = result(0, 20, 0, [(1.0, 10, 10, 100), (2.0, 20, 20, 200)])
SECOND = result(20, 50, 20, [(2.0, 40, 40, 400), (3.0, 50, 50, 500)], num_workers=2)


def test_history_frame_rates_start_at_each_calls_start():
    df = nb.history_frame({"a": FIRST, "b": SECOND})
    a, b = df[df.call == "a"], df[df.call == "b"]
    assert list(a.position) == [0, 10, 20] and list(b.position) == [20, 40, 50]
    assert math.isnan(a.samples_per_second.iloc[0])
    assert list(a.samples_per_second.iloc[1:]) == [10.0, 10.0]
    assert list(b.samples_per_second.iloc[1:]) == [10.0, 10.0]  # (40-20)/2 s, then (50-40)/1 s
    assert list(b.tokens_per_second.iloc[1:]) == [100.0, 100.0]


def test_results_frame_has_one_row_per_call():
    df = nb.results_frame([FIRST, SECOND])
    assert list(df.index) == ["r #1", "r #2"]
    assert list(df.start_position) == [0, 20] and list(df.num_workers) == [1, 2]


def test_plots_draw_what_they_are_given():
    ax = nb.plot_throughput({"a": FIRST, "b": SECOND})
    assert [len(line.get_xdata()) for line in ax.get_lines()] == [2, 2]
    summary = [{"level": 0, "patterns": 5, "total_frequency": 7}, {"level": 1, "patterns": 2, "total_frequency": 2}]
    ax = nb.plot_patterns_per_level(summary)
    assert sorted(p.get_height() for p in ax.patches) == [2, 2, 5, 7]
    dist = [{"level": 0, "frequency": 1, "patterns": 4}, {"level": 0, "frequency": 3, "patterns": 1},
            {"level": 1, "frequency": 1, "patterns": 2}]
    ax = nb.plot_frequency_distribution(dist)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log" and len(ax.get_lines()) == 2


def test_with_changes_validates(tmp_path):
    import pytest

    from streamtrain import ConfigError
    from streamtrain.config import DatasetConfig, RunConfig

    config = RunConfig(run_name="r", dataset=DatasetConfig(path="parquet", data_files="x"), checkpoint_dir=tmp_path)
    assert nb.with_changes(config, max_samples=5).max_samples == 5
    with pytest.raises(ConfigError, match="max_samples"):
        nb.with_changes(config, max_samples=-1)
