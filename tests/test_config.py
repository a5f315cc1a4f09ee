"""Run config: loading, every bad field named with its path, and the must-match / may-change resume rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamtrain.config import (
    ClientConfig,
    DatasetConfig,
    LayerConfig,
    RunConfig,
    check_resume,
    config_json_schema,
    load_config,
    parse_config,
    resume_policy,
)
from streamtrain.errors import ConfigError, ResumeMismatch

GOOD = {"run_name": "run1", "dataset": {"path": "parquet", "data_files": "data/*.parquet"}}


def with_(base: dict, **changes) -> dict:
    """A deep copy of base with dotted-path changes ("dataset.min_chars": -1)."""
    data = json.loads(json.dumps(base))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return data


def test_defaults() -> None:
    cfg = parse_config(GOOD)
    assert cfg.server_url is None and cfg.tokenizer == "words"
    assert [layer.chunk_size for layer in cfg.layers] == [8, 8, 8, 8]
    assert cfg.dataset.split == "train" and cfg.dataset.text_field == "text" and cfg.dataset.min_chars == 1
    assert (cfg.checkpoint_dir, cfg.keep_checkpoints, cfg.num_workers, cfg.max_samples) == (Path("checkpoints"), 3, 1, None)
    assert cfg.run_dir == Path("checkpoints/run1")


BAD = [
    # (description, config, the field path the message must name, a fragment of the message)
    ("unknown top-level key", with_(GOOD, max_sample=5), "max_sample", "unknown key"),
    ("unknown nested key", with_(GOOD, dataset__textfield="body"), "dataset.textfield", "unknown key"),
    ("unknown key in a layer", with_(GOOD, layers=[{"chunk_size": 4, "chunksize": 4}]), "layers[0].chunksize", "unknown key"),
    ("missing run_name", {"dataset": GOOD["dataset"]}, "run_name", "missing"),
    ("missing dataset", {"run_name": "r"}, "dataset", "missing"),
    ("missing dataset.path", with_(GOOD, dataset={"data_files": "x"}), "dataset.path", "missing"),
    ("run_name with /", with_(GOOD, run_name="a/b"), "run_name", "letters, digits"),
    ("run_name with ..", with_(GOOD, run_name="a..b"), "run_name", "no '..'"),
    ("run_name is ..", with_(GOOD, run_name=".."), "run_name", "no '..'"),
    ("run_name with a space", with_(GOOD, run_name="my run"), "run_name", "letters, digits"),
    ("empty run_name", with_(GOOD, run_name=""), "run_name", "letters, digits"),
    ("run_name not a string", with_(GOOD, run_name=5), "run_name", "valid string"),
    ("empty layers", with_(GOOD, layers=[]), "layers", "at least 1"),
    ("layers not a list", with_(GOOD, layers="8,8"), "layers", "valid list"),
    ("chunk_size 0", with_(GOOD, layers=[{"chunk_size": 0}]), "layers[0].chunk_size", "greater than or equal to 2"),
    ("chunk_size a string", with_(GOOD, layers=[{"chunk_size": 8}, {"chunk_size": "big"}]), "layers[1].chunk_size", "valid integer"),
    ("bad stm_mode", with_(GOOD, layers=[{"stm_mode": "SOMETIMES"}]), "layers[0].stm_mode", "'CLEAR' or 'ROLLING'"),
    ("negative min_chars", with_(GOOD, dataset__min_chars=-1), "dataset.min_chars", "greater than or equal to 0"),
    ("empty dataset.path", with_(GOOD, dataset__path=""), "dataset.path", "at least 1 character"),
    ("data_files a number", with_(GOOD, dataset__data_files=5), "dataset.data_files", "valid string"),
    ("server_url not http", with_(GOOD, server_url="ftp://host"), "server_url", "http:// or https://"),
    ("server_url no host", with_(GOOD, server_url="localhost:8000"), "server_url", "http:// or https://"),
    ("unknown tokenizer", with_(GOOD, tokenizer="bert"), "tokenizer", "'words' or 'gpt2'"),
    ("max_samples 0", with_(GOOD, max_samples=0), "max_samples", "greater than or equal to 1"),
    ("max_samples text", with_(GOOD, max_samples="all"), "max_samples", "valid integer"),
    ("num_workers 0", with_(GOOD, num_workers=0), "num_workers", "greater than or equal to 1"),
    ("checkpoint_every 0", with_(GOOD, checkpoint_every=0), "checkpoint_every", "greater than or equal to 1"),
    ("keep_checkpoints 0", with_(GOOD, keep_checkpoints=0), "keep_checkpoints", "greater than or equal to 1"),
    ("negative interval", with_(GOOD, checkpoint_every_seconds=-5), "checkpoint_every_seconds", "greater than 0"),
    ("client timeout 0", with_(GOOD, client__read_timeout=0), "client.read_timeout", "greater than 0"),
    ("recall_threshold > 1", with_(GOOD, layers=[{"recall_threshold": 1.5}]), "layers[0].recall_threshold", "less than or equal to 1"),
]


@pytest.mark.parametrize(("config", "field", "fragment"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_names_the_field(config: dict, field: str, fragment: str) -> None:
    """Each bad config is rejected with a line that starts with the field's path."""
    with pytest.raises(ConfigError) as info:
        parse_config(config, "run.toml")
    msg = str(info.value)
    assert msg.startswith("invalid config run.toml:")
    line = next((ln for ln in msg.splitlines() if ln.strip().startswith(f"{field}:")), None)
    assert line is not None, msg
    assert fragment in line, msg
    assert "Value error," not in msg


def test_every_problem_is_listed_at_once() -> None:
    """A config with several mistakes gets all of them in one message, not one per attempt."""
    bad = with_(GOOD, run_name="a b", typo=1, dataset__min_chars=-3, layers=[{"chunk_size": 1}])
    with pytest.raises(ConfigError, match=r"4 problem\(s\)") as info:
        parse_config(bad)
    for field in ("run_name", "typo", "dataset.min_chars", "layers[0].chunk_size"):
        assert f"  {field}:" in str(info.value)


def test_load_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(
        'run_name = "t1"\nmax_samples = 50\n[dataset]\npath = "text"\ndata_files = "a.txt"\n'
        "[[layers]]\nchunk_size = 4\n[[layers]]\nchunk_size = 3\n"
    )
    cfg = load_config(toml)
    assert (cfg.run_name, cfg.max_samples, [la.chunk_size for la in cfg.layers]) == ("t1", 50, [4, 3])
    js = tmp_path / "run.json"
    js.write_text(cfg.model_dump_json())
    assert load_config(js) == cfg


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("bad.toml", 'run_name = "x\n[dataset]\n', "is not valid TOML"),
        ("bad.json", '{"run_name": "x",', "is not valid JSON"),
        ("list.json", "[1, 2]", "must hold an object"),
        ("typo.toml", 'run_name = "x"\n[dataset]\npath = "json"\nmin_char = 3\n', "dataset.min_char: unknown key"),
    ],
)
def test_malformed_files(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    """Malformed files say which file and what is wrong."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml does not exist"):
        load_config(tmp_path / "nope.toml")


# -- resume compatibility ----------------------------------------------------------------------------------


def test_every_field_is_classified() -> None:
    """No RunConfig field may be left without a resume policy (a new field must be decided on)."""
    policy = resume_policy()
    assert set(policy) == set(RunConfig.model_fields)
    assert all(p in ("must_match", "may_change") for p in policy.values()), policy


BASE = RunConfig(
    run_name="run1",
    dataset=DatasetConfig(path="parquet", data_files="data/*.parquet"),
    layers=[LayerConfig(chunk_size=8), LayerConfig(chunk_size=4)],
)

MUST_MATCH = [
    ("run_name", {"run_name": "run2"}, "run_name: checkpoint=\"run1\" current=\"run2\""),
    ("dataset.path", {"dataset": BASE.dataset.model_copy(update={"path": "json"})}, 'dataset.path: checkpoint="parquet" current="json"'),
    ("dataset.name", {"dataset": BASE.dataset.model_copy(update={"name": "en"})}, 'dataset.name: checkpoint=null current="en"'),
    ("dataset.data_files", {"dataset": BASE.dataset.model_copy(update={"data_files": "other/*.parquet"})}, "dataset.data_files: checkpoint="),
    ("dataset.split", {"dataset": BASE.dataset.model_copy(update={"split": "test"})}, 'dataset.split: checkpoint="train" current="test"'),
    ("dataset.text_field", {"dataset": BASE.dataset.model_copy(update={"text_field": "body"})}, "dataset.text_field:"),
    ("dataset.min_chars", {"dataset": BASE.dataset.model_copy(update={"min_chars": 5})}, "dataset.min_chars: checkpoint=1 current=5"),
    ("tokenizer", {"tokenizer": "gpt2"}, 'tokenizer: checkpoint="words" current="gpt2"'),
    ("layers (count)", {"layers": BASE.layers[:1]}, "layers.length: checkpoint=2 current=1"),
    ("layers[1].chunk_size", {"layers": [BASE.layers[0], LayerConfig(chunk_size=5)]}, "layers[1].chunk_size: checkpoint=4 current=5"),
    ("layers[0].max_pattern_length", {"layers": [LayerConfig(chunk_size=8, max_pattern_length=3), BASE.layers[1]]}, "layers[0].max_pattern_length:"),
    ("layers[0].stm_mode", {"layers": [LayerConfig(chunk_size=8, stm_mode="ROLLING"), BASE.layers[1]]}, "layers[0].stm_mode:"),
    ("layers[0].recall_threshold", {"layers": [LayerConfig(chunk_size=8, recall_threshold=0.5), BASE.layers[1]]}, "layers[0].recall_threshold:"),
    ("layers[0].max_predictions", {"layers": [LayerConfig(chunk_size=8, max_predictions=7), BASE.layers[1]]}, "layers[0].max_predictions:"),
]


def test_the_must_match_table_covers_every_must_match_field() -> None:
    covered = {name.split(".")[0].split(" ")[0].split("[")[0] for name, _, _ in MUST_MATCH}
    assert covered == {f for f, p in resume_policy().items() if p == "must_match"}
    layer_fields = {name.split(".")[1] for name, _, _ in MUST_MATCH if name.startswith("layers[")}
    assert layer_fields == set(LayerConfig.model_fields)
    dataset_fields = {name.split(".")[1] for name, _, _ in MUST_MATCH if name.startswith("dataset.")}
    assert dataset_fields == set(DatasetConfig.model_fields)


@pytest.mark.parametrize(("update", "line"), [m[1:] for m in MUST_MATCH], ids=[m[0] for m in MUST_MATCH])
def test_must_match_change_is_refused(update: dict, line: str) -> None:
    """Resuming with a must-match change is refused, naming field, both values, and the ways out."""
    current = BASE.model_copy(update=update)
    with pytest.raises(ResumeMismatch) as info:
        check_resume(BASE, current, "checkpoints/run1/ckpt-00000003.json")
    msg = str(info.value)
    assert line in msg
    assert "ckpt-00000003.json" in msg
    assert "restore these values" in msg and "another run_name" in msg and "--fresh" in msg


MAY_CHANGE = {
    "server_url": "http://127.0.0.1:9000",
    "server_token": "secret",
    "max_samples": 123,
    "checkpoint_dir": Path("elsewhere"),
    "checkpoint_every": 7,
    "checkpoint_every_seconds": 1.5,
    "keep_checkpoints": 9,
    "num_workers": 4,
    "max_failures": 0,
    "client": ClientConfig(read_timeout=3.0, retry_max_attempts=2),
}


def test_the_may_change_table_covers_every_may_change_field() -> None:
    assert set(MAY_CHANGE) == {f for f, p in resume_policy().items() if p == "may_change"}


@pytest.mark.parametrize("field", sorted(MAY_CHANGE))
def test_may_change_change_is_accepted(field: str) -> None:
    current = BASE.model_copy(update={field: MAY_CHANGE[field]})
    assert getattr(current, field) != getattr(BASE, field)
    check_resume(BASE, current, "ckpt.json")


def test_several_differences_are_all_listed() -> None:
    current = BASE.model_copy(update={"tokenizer": "gpt2", "run_name": "other", "num_workers": 3})
    with pytest.raises(ResumeMismatch, match=r"2 field\(s\)") as info:
        check_resume(BASE, current, "ckpt.json")
    assert "num_workers" not in str(info.value)


def test_json_schema_marks_the_policy() -> None:
    schema = config_json_schema()
    assert schema["properties"]["dataset"]["resume"] == "must_match"
    assert schema["properties"]["max_samples"]["resume"] == "may_change"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"run_name", "dataset"}


def test_readme_documents_every_field() -> None:
    """The README's config reference names every field, so docs cannot silently drift from the model."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    for model in (RunConfig, DatasetConfig, LayerConfig, ClientConfig):
        for name in model.model_fields:
            assert f"`{name}`" in readme, f"README.md does not document {model.__name__}.{name}"
