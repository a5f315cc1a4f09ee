"""Run config: loading, every bad field named with its path, and the must-match / may-change resume rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamtrain.config import (
    ClientConfig,
    DatasetConfig,
    HFTokenizer,
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
    ("server_url with a password", with_(GOOD, server_url="http://me:secret@host:8000"), "server_url", "user or password"),
    ("unknown tokenizer", with_(GOOD, tokenizer="bert"), "tokenizer", 'must be "words", "gpt2", or a table { hf = '),
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
    # the dump writes checkpoint_dir out ("checkpoints"), and a path written in a file is the file folder's
    assert load_config(js) == cfg.model_copy(update={"checkpoint_dir": tmp_path / "checkpoints"})


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
    ("dataset.binary_encoding", {"dataset": BASE.dataset.model_copy(update={"binary_encoding": "latin-1"})},
     'dataset.binary_encoding: checkpoint="utf-8" current="latin-1"'),
    ("dataset.revision", {"dataset": BASE.dataset.model_copy(update={"revision": "v2"})}, 'dataset.revision: checkpoint=null current="v2"'),
    ("dataset.load_kwargs", {"dataset": BASE.dataset.model_copy(update={"load_kwargs": {"encoding": "latin-1"}})},
     'dataset.load_kwargs.encoding: checkpoint="<absent>" current="latin-1"'),
    ("tokenizer", {"tokenizer": "gpt2"}, 'tokenizer: checkpoint="words" current="gpt2"'),
    ("tokenizer (hf)", {"tokenizer": HFTokenizer(hf="/t/tokenizer.json")}, 'tokenizer.hf: checkpoint="<absent>" current="/t/tokenizer.json"'),
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
    "client": ClientConfig(read_timeout=3.0, outage_seconds=60.0, retry_max_attempts=2),
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
    for model in (RunConfig, DatasetConfig, LayerConfig, ClientConfig, HFTokenizer):
        for name in model.model_fields:
            assert f"`{name}`" in readme, f"README.md does not document {model.__name__}.{name}"


# -- issue 13: Hugging Face tokenizers, loader options, paths relative to the config file ------------------


def test_hf_tokenizer_must_match_between_two_files() -> None:
    """Two runs with different tokenizer.json files: resuming one with the other is refused, naming both."""
    a = BASE.model_copy(update={"tokenizer": HFTokenizer(hf="/a/tokenizer.json")})
    b = parse_config({**a.model_dump(mode="json"), "tokenizer": {"hf": "/b/tokenizer.json"}})
    check_resume(a, parse_config(a.model_dump(mode="json")), "ckpt.json")  # round trip through JSON: the same
    with pytest.raises(ResumeMismatch, match=r'tokenizer\.hf: checkpoint="/a/tokenizer\.json" current="/b/tokenizer\.json"'):
        check_resume(a, b, "ckpt.json")


@pytest.mark.parametrize(
    ("tokenizer", "fragments"),
    [
        ("bpe", ['tokenizer: must be "words", "gpt2", or a table { hf = ']),
        (3, ["tokenizer: must be"]),
        ({"hff": "x"}, ["in the table: hf: required, but missing", "hff: unknown key"]),
        ({"hf": ""}, ["in the table: hf: String should have at least 1 character"]),
        ({"hf": 7}, ["in the table: hf: Input should be a valid string"]),
    ],
)
def test_bad_tokenizer_is_one_clear_problem(tokenizer: object, fragments: list[str]) -> None:
    """A bad tokenizer value is one problem naming the three accepted forms, not one per union branch."""
    with pytest.raises(ConfigError, match=r"1 problem\(s\)") as info:
        parse_config(with_(GOOD, tokenizer=tokenizer))
    for fragment in fragments:
        assert fragment in str(info.value)
    assert "literal" not in str(info.value) and "HFTokenizer" not in str(info.value)


def test_hf_tokenizer_and_loader_options_from_toml(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text(
        'run_name = "r"\ntokenizer = { hf = "bert-base-uncased" }\n'
        '[dataset]\npath = "text"\nrevision = "v1.2"\nload_kwargs = { encoding = "latin-1", sample_by = "paragraph" }\n'
    )
    cfg = load_config(tmp_path / "run.toml")
    assert cfg.tokenizer == HFTokenizer(hf="bert-base-uncased")  # a hub name: kept as it is
    assert cfg.dataset.revision == "v1.2"
    assert cfg.dataset.load_kwargs == {"encoding": "latin-1", "sample_by": "paragraph"}
    assert parse_config(GOOD).dataset.load_kwargs == {} and parse_config(GOOD).dataset.revision is None


@pytest.mark.parametrize("key", ["streaming", "split", "data_files", "name", "path", "revision"])
def test_load_kwargs_refuses_what_streamtrain_sets(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_(GOOD, dataset__load_kwargs={key: "x", "encoding": "utf-8"}))
    msg = str(info.value)
    assert "dataset.load_kwargs: must not hold arguments that streamtrain passes to load_dataset itself" in msg
    assert (f"{key} (set dataset.{key} instead)" if key != "streaming" else "streaming (streamtrain always streams)") in msg
    assert "encoding" not in msg.split("itself:")[1].split("(got")[0]  # only the colliding key is named


def test_load_kwargs_values_must_be_json() -> None:
    """Values go into every checkpoint (JSON): a Python object is refused at once, not at the first save."""
    with pytest.raises(ConfigError, match="dataset.load_kwargs"):
        parse_config(with_(GOOD, dataset__load_kwargs={}) | {"dataset": {"path": "text", "load_kwargs": {"x": object()}}})
    assert parse_config(with_(GOOD, dataset__load_kwargs={"a": [1, {"b": None}]})).dataset.load_kwargs == {"a": [1, {"b": None}]}


def _write(path: Path, data: dict) -> Path:
    """A config file: JSON (TOML has no null and cannot hold every shape tested here as simply)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("data_files", "expected"),
    [
        ("data/*.parquet", "{cfg}/data/*.parquet"),
        ("./data/../shards/a.parquet", "{cfg}/shards/a.parquet"),
        (["a.parquet", "/abs/b.parquet"], ["{cfg}/a.parquet", "/abs/b.parquet"]),
        ({"train": "tr/*.parquet", "test": ["te/1.parquet", "hf://datasets/o/d/x.parquet"]},
         {"train": "{cfg}/tr/*.parquet", "test": ["{cfg}/te/1.parquet", "hf://datasets/o/d/x.parquet"]}),
        ("https://example.org/d.parquet", "https://example.org/d.parquet"),
        ("zip://inner.parquet::archive.zip", "zip://inner.parquet::archive.zip"),
        ("~/data/d.parquet", "~/data/d.parquet"),
        ("/abs/d.parquet", "/abs/d.parquet"),
    ],
)
def test_relative_data_files_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_files: object, expected: object
) -> None:
    """Whatever the working folder, a relative local data_files path is the config file's folder's."""
    cfg_dir = tmp_path / "project" / "configs"
    config = _write(cfg_dir / "run.json", {"run_name": "r", "dataset": {"path": "parquet", "data_files": data_files}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    want = json.loads(json.dumps(expected).replace("{cfg}", str(cfg_dir)))
    assert load_config(config).dataset.data_files == want
    # the same file named by a relative path from another working folder gives the same config
    monkeypatch.chdir(tmp_path / "project")
    assert load_config(Path("configs/run.json")).dataset.data_files == want


def test_hub_dataset_data_files_are_files_of_the_repository(tmp_path: Path) -> None:
    """With a hub dataset as path, data_files name files inside its repository: never resolved."""
    config = _write(tmp_path / "c" / "run.json",
                    {"run_name": "r", "dataset": {"path": "allenai/c4", "data_files": "en/c4-train.00000-of-01024.json.gz"}})
    assert load_config(config).dataset.data_files == "en/c4-train.00000-of-01024.json.gz"


def test_checkpoint_dir_and_tokenizer_file_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg_dir = tmp_path / "c"
    monkeypatch.chdir(tmp_path)
    config = _write(cfg_dir / "run.json", {"run_name": "r", "checkpoint_dir": "ck", "tokenizer": {"hf": "tok/tokenizer.json"},
                                           "dataset": {"path": "text", "data_files": "a.txt"}})
    cfg = load_config(config)
    assert cfg.checkpoint_dir == cfg_dir / "ck" and cfg.run_dir == cfg_dir / "ck" / "r"
    assert cfg.tokenizer == HFTokenizer(hf=str(cfg_dir / "tok" / "tokenizer.json"))
    assert cfg.dataset.data_files == str(cfg_dir / "a.txt")
    # relative_to= names another folder; a path the file leaves out keeps its working-folder default
    other = load_config(_write(cfg_dir / "run2.json", {"run_name": "r", "dataset": {"path": "text", "data_files": "a.txt"}}),
                        relative_to=tmp_path / "base")
    assert other.dataset.data_files == str(tmp_path / "base" / "a.txt")
    assert other.checkpoint_dir == Path("checkpoints")


def test_paths_given_in_python_stay_relative_to_the_working_folder() -> None:
    cfg = parse_config({"run_name": "r", "checkpoint_dir": "ck", "tokenizer": {"hf": "t/tokenizer.json"},
                        "dataset": {"path": "text", "data_files": ["a.txt"]}})
    assert cfg.checkpoint_dir == Path("ck") and cfg.dataset.data_files == ["a.txt"]
    assert cfg.tokenizer == HFTokenizer(hf="t/tokenizer.json")
    assert RunConfig(run_name="r", dataset=DatasetConfig(path="text", data_files="a.txt")).dataset.data_files == "a.txt"


def test_a_run_whose_folder_moved_with_the_rule_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """checkpoint_dir = "ck" once meant <working folder>/ck. A run with checkpoints there, and none beside the
    config, is refused (going on would train it again from 0) with both absolute paths to choose from."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck" / "r").mkdir(parents=True)
    (tmp_path / "ck" / "r" / "ckpt-00000001.json").write_text("{}")
    config = _write(tmp_path / "c" / "run.json", {"run_name": "r", "checkpoint_dir": "ck", "dataset": {"path": "text"}})
    with pytest.raises(ConfigError) as info:
        load_config(config)
    msg = str(info.value)
    assert str(tmp_path / "ck" / "r") in msg and str(tmp_path / "c" / "ck" / "r") in msg
    assert f'checkpoint_dir = "{tmp_path / "ck"}"' in msg and f'checkpoint_dir = "{tmp_path / "c" / "ck"}"' in msg
    # either choice, written absolute, loads
    _write(config, {"run_name": "r", "checkpoint_dir": str(tmp_path / "ck"), "dataset": {"path": "text"}})
    assert load_config(config).run_dir == tmp_path / "ck" / "r"
    # once the config's own folder holds the run, the working folder's copy no longer matters
    _write(config, {"run_name": "r", "checkpoint_dir": "ck", "dataset": {"path": "text"}})
    (tmp_path / "c" / "ck" / "r").mkdir(parents=True)
    (tmp_path / "c" / "ck" / "r" / "ckpt-00000001.json").write_text("{}")
    assert load_config(config).run_dir == tmp_path / "c" / "ck" / "r"


# -- the outage budget and the former retry fields ----------------------------------------------------------


def test_the_outage_budget_and_the_fields_it_replaced() -> None:
    """outage_seconds is 15 minutes and no attempt cap cuts it short by default. The config files and stored
    checkpoints of earlier versions hold retry_total_seconds and retry_max_attempts: they still load, the first
    read as outage_seconds, the second as the cap it always was; both names at once is refused."""
    assert (ClientConfig().outage_seconds, ClientConfig().retry_max_attempts) == (900.0, None)
    old = parse_config(with_(GOOD, client__retry_total_seconds=120.0, client__retry_max_attempts=50))
    assert (old.client.outage_seconds, old.client.retry_max_attempts) == (120.0, 50)
    assert "retry_total_seconds" not in old.model_dump()["client"]
    assert RunConfig.model_validate(json.loads(old.model_dump_json())) == old  # as a checkpoint stores it
    with pytest.raises(ConfigError, match=r"client.*former name of outage_seconds"):
        parse_config(with_(GOOD, client__retry_total_seconds=120.0, client__outage_seconds=60.0))
    with pytest.raises(ConfigError, match="outage_seconds"):
        parse_config(with_(GOOD, client__outage_seconds=0))
