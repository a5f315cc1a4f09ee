"""Run configuration: pydantic models, TOML/JSON loading, and the resume compatibility rule.

Every top-level field is marked for resume (``json_schema_extra={"resume": ...}``): ``must_match`` when it decides
*what* is trained or *where* (a resume under another value is refused), ``may_change`` when it decides *how* or
*how far*. A test checks that every field carries one, so a new field cannot be forgotten.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError, ResumeMismatch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

MUST_MATCH: dict[str, JsonValue] = {"resume": "must_match"}
MAY_CHANGE: dict[str, JsonValue] = {"resume": "may_change"}

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: The arguments of ``datasets.load_dataset`` that streamtrain sets itself (from the fields of ``[dataset]``, and
#: streaming=True): ``dataset.load_kwargs`` must not hold them.
LOAD_DATASET_OWN_ARGS = ("path", "name", "data_files", "split", "revision", "streaming")


class DatasetConfig(StrictModel):
    """What to stream: the arguments of ``datasets.load_dataset(..., streaming=True)`` plus the text filter."""

    path: str = Field(min_length=1, description="Hub name, or a builder such as 'parquet', 'json', 'text'.")
    name: str | None = Field(None, description="Hub config name.")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="Local files (or globs) for builders such as 'parquet', 'json', 'text'."
    )
    split: str = Field("train", description="The split to stream.")
    text_field: str = Field(
        "text", min_length=1,
        description="The record field holding the text; a dotted path ('meta.body') reaches a nested field. A "
        "record key that holds the dots itself (a column 'meta.body', as datasets' flatten() names them) is used "
        "first, when the record has it and it is not null.",
    )
    min_chars: int = Field(1, ge=0, description="Records whose text is shorter are counted as filtered.")
    binary_encoding: str = Field(
        "utf-8", min_length=1,
        description="How a text field holding bytes (a Parquet or Arrow binary column) is decoded; a record whose "
        "bytes do not decode is filtered as undecodable.",
    )
    revision: str | None = Field(
        None, min_length=1, description="Hub dataset revision (a branch, tag or commit) passed to load_dataset."
    )
    load_kwargs: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="More keyword arguments of datasets.load_dataset (e.g. {encoding = 'latin-1'} for the text "
        "builder); not those streamtrain sets itself: " + ", ".join(LOAD_DATASET_OWN_ARGS) + ".",
    )

    @field_validator("binary_encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        try:
            info = codecs.lookup(v)
        except LookupError:
            raise ValueError(f"{v!r} is not an encoding Python knows (e.g. 'utf-8', 'latin-1', 'cp1252')") from None
        if not getattr(info, "_is_text_encoding", True):
            raise ValueError(f"{v!r} is not a text encoding (e.g. 'utf-8', 'latin-1', 'cp1252')")
        return v

    @field_validator("load_kwargs")
    @classmethod
    def _no_own_args(cls, v: dict[str, JsonValue]) -> dict[str, JsonValue]:
        taken = [k for k in v if k in LOAD_DATASET_OWN_ARGS]
        if taken:
            fields = {"path": "dataset.path", "name": "dataset.name", "data_files": "dataset.data_files",
                      "split": "dataset.split", "revision": "dataset.revision"}
            hints = [f"{k} (set {fields[k]} instead)" if k in fields else f"{k} (streamtrain always streams)"
                     for k in taken]
            raise ValueError(
                "must not hold arguments that streamtrain passes to load_dataset itself: " + ", ".join(hints)
            )
        return v


class LayerConfig(StrictModel):
    """One level of the hierarchy: how its symbols are chunked, and the KATO settings of its node."""

    chunk_size: int = Field(8, ge=2, description="Symbols per chunk; one chunk is learned as one pattern.")
    max_pattern_length: int = Field(
        0, ge=0, description="KATO auto-learn: learn every N events of a chunk (0 = off, learn whole chunks)."
    )
    stm_mode: Literal["CLEAR", "ROLLING"] = Field("CLEAR", description="KATO auto-learn mode.")
    recall_threshold: float = Field(0.1, ge=0.0, le=1.0, description="Used by predictions on this node.")
    max_predictions: int = Field(100, ge=1, le=10000, description="Used by predictions on this node.")

    def session_config(self) -> dict[str, Any]:
        """The KATO session config for this level's node during training.

        Auto-learn is applied by the trainer (see ``hierarchy.learn_units``), never by the server, so every
        request has an effect the client can verify; predictions are off while training (KATO would scan
        every pattern on every observe).
        """
        return {
            "max_pattern_length": 0,
            "stm_mode": "CLEAR",
            "process_predictions": False,
            "recall_threshold": self.recall_threshold,
            "max_predictions": self.max_predictions,
        }


class ClientConfig(StrictModel):
    """Timeouts and the outage budget of every server call."""

    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(30.0, gt=0)
    outage_seconds: float = Field(
        900.0, gt=0,
        description="How long the server may keep failing (5xx answers 500/502/503/504, 429, refused connections, "
        "time-outs), counted from the outage's first failure and shared by all the run's calls, before the run "
        "stops with an 'error' checkpoint. 15 minutes ride out a server, container or KATO restart and a rolling "
        "deploy; a server dead for good stops an unattended run within them. Former name: retry_total_seconds.",
    )
    retry_max_attempts: int | None = Field(
        None, ge=1,
        description="At most this many attempts of one call (and resends of one unit after lost answers), even "
        "within outage_seconds; absent: no cap, outage_seconds alone bounds the retries.",
    )
    backoff_initial: float = Field(0.1, gt=0)
    backoff_max: float = Field(5.0, gt=0)
    learn_batch: bool = Field(
        True,
        description="Send whole samples (every level) in keyed requests, several per request, when the server "
        "offers the learn-batch extensions (the embedded server does); off: one request per chunk, as with a real "
        "KATO.",
    )
    samples_per_request: int = Field(
        128, ge=1, le=256,
        description="With learn_batch on a server that offers several samples per request: at most this many "
        "whole samples in one request (a worker sends those already waiting; it never waits for more).",
    )

    @model_validator(mode="before")
    @classmethod
    def _former_names(cls, data: Any) -> Any:
        """``retry_total_seconds`` (in config files and the checkpoints of earlier versions) is read as
        ``outage_seconds``: a time after which failing calls give up, now counted per outage rather than per call."""
        if isinstance(data, dict) and "retry_total_seconds" in data:
            if "outage_seconds" in data:
                raise ValueError("retry_total_seconds is the former name of outage_seconds: give only outage_seconds")
            data = {("outage_seconds" if k == "retry_total_seconds" else k): v for k, v in data.items()}
        return data


class HFTokenizer(StrictModel):
    """A Hugging Face ``tokenizers`` tokenizer: ``tokenizer = { hf = "<tokenizer.json path, or a hub name>" }``."""

    hf: str = Field(
        min_length=1,
        description="A tokenizer.json file (a value ending in '.json'; in a config file, relative to the file's "
        "folder), or a Hugging Face Hub model name whose tokenizer.json is fetched (or read from the hub cache "
        "offline).",
    )


def _default_layers() -> list[LayerConfig]:
    return [LayerConfig(chunk_size=8) for _ in range(4)]


class RunConfig(StrictModel):
    """A training run. Load one with :func:`load_config`, or build it in Python."""

    run_name: str = Field(
        json_schema_extra=MUST_MATCH, description="Names the checkpoint folder and the server nodes."
    )
    server_url: str | None = Field(
        None, json_schema_extra=MAY_CHANGE, description="A KATO server; absent = start the embedded server."
    )
    server_token: SecretStr | None = Field(
        default_factory=lambda: _token_from_env(),
        exclude=True,  # a secret: never in a checkpoint, the journal or `inspect` output
        repr=False,
        json_schema_extra=MAY_CHANGE,
        description="Bearer token of server_url, if it wants one (absent: the "
        "STREAMTRAIN_SERVER_TOKEN environment variable, if set). Never written to checkpoints, the journal or "
        "logs. The embedded server ignores it: each start generates its own token.",
    )
    dataset: DatasetConfig = Field(json_schema_extra=MUST_MATCH, description="What to stream, and the text filter.")
    tokenizer: Literal["words", "gpt2"] | HFTokenizer = Field(
        "words",
        json_schema_extra=MUST_MATCH,
        description="'words': offline words-and-punctuation; 'gpt2': tiktoken BPE (needs its file locally); "
        "{hf = '<tokenizer.json or hub name>'}: a Hugging Face tokenizers tokenizer.",
    )
    layers: list[LayerConfig] = Field(
        default_factory=_default_layers,
        min_length=1,
        json_schema_extra=MUST_MATCH,
        description="The hierarchy, level 0 first: one KATO node per level.",
    )
    max_samples: int | None = Field(
        None,
        ge=1,
        json_schema_extra=MAY_CHANGE,
        description="Stop at this raw stream position (records read, filtered ones included); absent = to the end.",
    )
    checkpoint_dir: Path = Field(
        Path("checkpoints"), json_schema_extra=MAY_CHANGE, description="Run folders live here: <checkpoint_dir>/<run_name>/."
    )
    checkpoint_every: int = Field(1000, ge=1, json_schema_extra=MAY_CHANGE, description="Samples between checkpoints.")
    checkpoint_every_seconds: float | None = Field(
        300.0, gt=0, json_schema_extra=MAY_CHANGE, description="Seconds between checkpoints (also)."
    )
    keep_checkpoints: int = Field(3, ge=1, json_schema_extra=MAY_CHANGE, description="Newest checkpoint files kept.")
    num_workers: int = Field(1, ge=1, le=64, json_schema_extra=MAY_CHANGE, description="Samples trained in parallel.")
    max_failures: int = Field(
        100, ge=0, json_schema_extra=MAY_CHANGE, description="Stop the run when more samples than this have failed for their own content."
    )
    client: ClientConfig = Field(
        default_factory=ClientConfig, json_schema_extra=MAY_CHANGE, description="Timeouts and retries of server calls."
    )

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, v: str) -> str:
        if ".." in v or not _RUN_NAME.match(v):
            raise ValueError(
                "must be 1-100 characters of letters, digits, '_', '-' or '.', start with a letter or digit, "
                "and contain no '..' (it names a folder and the server's nodes)"
            )
        return v

    @field_validator("tokenizer", mode="wrap")
    @classmethod
    def _one_tokenizer_message(cls, v: Any, handler: Any) -> Any:
        """One readable problem instead of pydantic's one per union branch."""
        try:
            return handler(v)
        except ValidationError:
            pass
        expected = 'must be "words", "gpt2", or a table { hf = "<path of a tokenizer.json, or a hub name>" }'
        if not isinstance(v, dict):
            raise ValueError(expected) from None
        try:
            HFTokenizer.model_validate(v)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"]) or "hf"
                if err["type"] == "extra_forbidden":
                    problems.append(f"{key}: unknown key (the table holds only hf)")
                elif err["type"] == "missing":
                    problems.append(f"{key}: required, but missing")
                else:
                    problems.append(f"{key}: {err['msg']}")
            raise ValueError(f"{expected}; in the table: " + "; ".join(problems)) from None
        raise ValueError(expected) from None  # pragma: no cover - the table validated, so the union did

    @field_validator("server_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:8000")
        if "@" in v.split("://", 1)[1].split("/", 1)[0]:  # the URL is written into every checkpoint
            raise ValueError("must not hold a user or password (user:pass@host): it would be written into every "
                             "checkpoint; give the secret as server_token or $STREAMTRAIN_SERVER_TOKEN")
        return v.rstrip("/")

    def server_token_value(self) -> str | None:
        """The bearer token for ``server_url`` as plain text (only for the Authorization header), or None."""
        return self.server_token.get_secret_value() if self.server_token is not None else None

    @property
    def run_dir(self) -> Path:
        """The run's folder: checkpoints, journal and (embedded server) knowledge base."""
        return Path(self.checkpoint_dir) / self.run_name

    def node_id(self, level: int) -> str:
        """The KATO node of a level: deterministic in run_name and level."""
        return f"{self.run_name}-L{level}"

    def with_overrides(self, **update: Any) -> RunConfig:
        """A copy with ``update`` applied, validated like a config file (``model_copy(update=...)`` validates
        nothing: ``num_workers=0`` would hang a run, 1000 would write checkpoints no resume accepts)."""
        data = {name: getattr(self, name) for name in type(self).model_fields}
        data.update(update)
        try:
            return type(self).model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "(after overrides)")) from None


#: The environment variable that holds the bearer token of ``server_url`` when the config does not set
#: ``server_token`` (``streamtrain serve`` reads the same variable for the token it requires).
SERVER_TOKEN_ENV = "STREAMTRAIN_SERVER_TOKEN"


def _token_from_env() -> SecretStr | None:
    value = os.environ.get(SERVER_TOKEN_ENV, "").strip()
    return SecretStr(value) if value else None


def resume_policy() -> dict[str, str]:
    """Field name -> 'must_match' or 'may_change', read from the model itself."""
    out = {}
    for name, f in RunConfig.model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        out[name] = str(extra.get("resume", ""))
    return out


def leaves(value: Any, prefix: str) -> dict[str, Any]:
    """A config value as dotted paths to its scalar values (``layers[0].chunk_size``), lists of tables with their
    ``.length``: what a resume and a comparison of runs compare field by field."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(leaves(v, f"{prefix}.{k}"))
        return out
    if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        out = {f"{prefix}.length": len(value)}
        for i, v in enumerate(value):
            out.update(leaves(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _is_local_path(value: Any) -> bool:
    """A path on this machine: a string that is not a URL or fsspec path (hf://, s3://, zip://...::...)."""
    return isinstance(value, str) and bool(value) and "://" not in value and "::" not in value


def _same_place(old: Any, new: Any, old_root: Path, new_root: Path) -> bool:
    """Whether two values of a must-match path name the same file: equal as written, or absolute local paths at
    the same place relative to their run folders (a project folder of config, data and checkpoints moved or
    copied as a whole). URLs and hub paths match only as written."""
    if old == new:
        return True
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(_same_place(a, b, old_root, new_root) for a, b in zip(old, new, strict=True))
    if not (_is_local_path(old) and _is_local_path(new) and os.path.isabs(old) and os.path.isabs(new)
            and old_root.is_absolute() and new_root.is_absolute()):
        return False
    return os.path.relpath(old, old_root) == os.path.relpath(new, new_root)


def _all_local(value: Any) -> bool:
    """Every path of a data_files value (a string, a list, or a split -> files table) names a local file."""
    if isinstance(value, dict):
        return all(_all_local(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_local(v) for v in value)
    return _is_local_path(value)


def _path_kind(key: str, old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """"data_files" or "tokenizer" when the must-match leaf ``key`` holds local file paths in both configs."""
    if key.startswith("dataset.data_files") and old["dataset"]["path"] == new["dataset"]["path"] in _file_builders():
        return "data_files"
    if key == "tokenizer.hf" and all(str(c["tokenizer"]["hf"]).lower().endswith(".json") for c in (old, new)):
        return "tokenizer"
    return None


def resume_differences(checkpoint: RunConfig, current: RunConfig, *,
                       files_checked: bool = False) -> list[tuple[str, Any, Any]]:
    """Every must-match leaf that differs, as (dotted path, checkpoint value, current value).

    Local paths (a file builder's ``dataset.data_files``, a ``tokenizer.hf`` file) also match when they name the
    same place relative to their run folders, so a project folder moved as a whole resumes. ``files_checked``:
    the dataset's resolved files are compared next by content with the files the checkpoint recorded
    (``datafiles.check_dataset``, which allows a moved folder), so local ``data_files`` need not match at all
    here. Hub paths and URLs match only as written.
    """
    diffs: list[tuple[str, Any, Any]] = []
    old, new = checkpoint.model_dump(mode="json"), current.model_dump(mode="json")
    old_root, new_root = Path(checkpoint.run_dir), Path(current.run_dir)
    by_content = files_checked and all(_all_local(c["dataset"]["data_files"]) for c in (old, new))
    for name, policy in resume_policy().items():
        if policy != "must_match":
            continue
        a, b = leaves(old[name], name), leaves(new[name], name)
        for key in sorted(set(a) | set(b)):
            x, y = a.get(key, "<absent>"), b.get(key, "<absent>")
            if x == y:
                continue
            kind = _path_kind(key, old, new) if key in a and key in b else None
            if kind == "data_files" and by_content:
                continue
            if kind is not None and _same_place(x, y, old_root, new_root):
                continue
            diffs.append((key, x, y))
    return diffs


def check_resume(checkpoint: RunConfig, current: RunConfig, checkpoint_path: Path | str, *,
                 files_checked: bool = False) -> None:
    """Refuse to continue a run whose must-match fields changed; name each field and the ways out
    (``files_checked``: see :func:`resume_differences`)."""
    diffs = resume_differences(checkpoint, current, files_checked=files_checked)
    if not diffs:
        return
    lines = [f"  {path}: checkpoint={json.dumps(a)} current={json.dumps(b)}" for path, a, b in diffs]
    raise ResumeMismatch(
        f"cannot resume run '{current.run_name}' from {checkpoint_path}: the config differs in "
        f"{len(diffs)} field(s) that must match on resume:\n" + "\n".join(lines) + "\n"
        "Ways out: restore these values in the config; or start a new run under another run_name; "
        f"or move the folder {current.run_dir} aside (or train with --fresh) to start this run over."
    )


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (directly, in a list, or optional), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _split_loc(loc: tuple[Any, ...]) -> tuple[str, bool]:
    """A readable field path ("layers[0].chunk_size") and whether pydantic added union-branch tags after it."""
    model: type[BaseModel] | None = RunConfig
    path = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        if model is None:  # past a field whose type is not a model: the rest names union branches
            return path, True
        path += f".{part}" if path else str(part)
        field = model.model_fields.get(part)
        model = _model_of(field.annotation) if field is not None else None
        if field is None:
            return path, i + 1 < len(loc)
    return path, False


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per bad field, with its dotted path: every problem at once, not just the first."""
    groups: dict[str, list[Any]] = {}  # pydantic's ErrorDetails, read as mappings
    for err in exc.errors():
        path, _ = _split_loc(tuple(err["loc"]))
        groups.setdefault(path or "<root>", []).append(err)
    lines = []
    for path, errs in groups.items():
        msgs = []
        for err in errs:
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check its spelling; unknown keys are never ignored)"
            elif err["type"] == "missing":
                msg = "required, but missing"
            else:
                msg = err["msg"].removeprefix("Value error, ")
            if msg not in msgs:
                msgs.append(msg)
        line = f"  {path}: " + "; or ".join(msgs)
        first = errs[0]
        if first["type"] not in ("missing", "extra_forbidden"):
            line += f" (got {first['input']!r})"
        lines.append(line)
    return f"invalid config {source}: {len(lines)} problem(s):\n" + "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a mapping into a RunConfig, raising ConfigError that lists every bad field."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


#: datasets' packaged file builders, whose data_files are local paths (when datasets cannot tell its own list).
_FILE_BUILDERS = frozenset(
    {"arrow", "audiofolder", "csv", "imagefolder", "json", "pandas", "parquet", "pdffolder", "text", "videofolder",
     "webdataset", "xml"}
)


def _file_builders() -> frozenset[str]:
    """The builder names (``path = "parquet"`` ...) whose data_files name local files, not files of a hub repo."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    except ImportError:  # pragma: no cover - another datasets layout
        return _FILE_BUILDERS
    return _FILE_BUILDERS | frozenset(_PACKAGED_DATASETS_MODULES)


def _is_relative_local(value: str) -> bool:
    """A relative path on this machine: not absolute, not a URL or fsspec path (hf://, s3://, zip://...::...),
    not ~-prefixed."""
    return bool(value) and not (os.path.isabs(value) or "://" in value or "::" in value or value.startswith("~"))


def _against(base: Path, value: Any) -> Any:
    if isinstance(value, str) and _is_relative_local(value):
        return os.path.normpath(os.path.join(base, value))
    return value


def resolve_config_paths(data: dict[str, Any], base: str | Path) -> dict[str, Any]:
    """A copy of a config mapping read from a file, with its relative local paths joined to ``base`` (the file's
    folder): ``checkpoint_dir``, ``dataset.data_files`` when ``dataset.path`` is a file builder (parquet, json,
    text ...; a hub dataset's data_files name files of its repository and are left as they are), and a
    ``tokenizer.hf`` that ends in ``.json``. Absolute paths, URLs and hub paths (``hf://...``) are kept. Values
    of the wrong type are kept too, for validation to report."""
    base = Path(base).absolute()
    data = dict(data)
    if "checkpoint_dir" in data:
        data["checkpoint_dir"] = _against(base, data["checkpoint_dir"])
    dataset = data.get("dataset")
    if isinstance(dataset, dict) and isinstance(dataset.get("path"), str) and dataset.get("data_files") is not None:
        files = dataset["data_files"]
        if dataset["path"] in _file_builders():
            if isinstance(files, list):
                files = [_against(base, f) for f in files]
            elif isinstance(files, dict):
                files = {split: [_against(base, f) for f in v] if isinstance(v, list) else _against(base, v)
                         for split, v in files.items()}
            else:
                files = _against(base, files)
            data["dataset"] = {**dataset, "data_files": files}
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, dict) and isinstance(tokenizer.get("hf"), str) and tokenizer["hf"].lower().endswith(".json"):
        data["tokenizer"] = {**tokenizer, "hf": _against(base, tokenizer["hf"])}
    return data


def load_config(path: str | Path, *, relative_to: str | Path | None = None) -> RunConfig:
    """Load a RunConfig from a .toml or .json file (decided by the file's suffix).

    Relative paths in the file (``checkpoint_dir``, the local ``dataset.data_files``, a ``tokenizer.hf`` file)
    are relative to the file's folder, whatever the working folder, and come back absolute; ``relative_to``
    names another folder to resolve them against (the bundled demo config uses the working folder). A path
    the file leaves out keeps its default (``checkpoint_dir = "checkpoints"``, relative to the working folder).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (or is not a file); pass the path of a .toml or .json run config")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid {path.suffix.lstrip('.').upper() or 'TOML'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold an object/table at the top level")
    config = parse_config(resolve_config_paths(data, path.parent if relative_to is None else relative_to), str(path))
    _refuse_a_moved_run(data.get("checkpoint_dir"), config, path)
    return config


def _refuse_a_moved_run(written: Any, config: RunConfig, path: Path) -> None:
    """A relative checkpoint_dir once meant the working folder's. When that older reading finds this run's
    checkpoints and the file folder's reading finds none, continuing would start the run over (and train its
    samples a second time into a server that keeps its knowledge base): refuse, and say how to choose."""
    if not isinstance(written, str) or not _is_relative_local(written):
        return
    old_dir, new_dir = Path(written).absolute(), Path(config.checkpoint_dir)
    old_run, new_run = old_dir / config.run_name, config.run_dir
    if os.path.normpath(old_run) == os.path.normpath(new_run):
        return
    if any(old_run.glob("ckpt-*.json")) and not any(new_run.glob("ckpt-*.json")):
        raise ConfigError(
            f"config file {path}: checkpoint_dir = {written!r} is relative to the config file's folder, so run "
            f"'{config.run_name}' lives in {new_run}, which holds no checkpoint; but {old_run} (the same path "
            "taken from the working folder, as streamtrain read it before) holds this run's checkpoints, and "
            "training on would start the run over.\nWhat to do: to continue that run, set checkpoint_dir = "
            f"{json.dumps(str(old_dir))} (or move {old_run} to {new_run}); to start a separate run in the config's "
            f"folder, set checkpoint_dir = {json.dumps(str(new_dir))}."
        )


def config_json_schema() -> dict[str, Any]:
    """JSON Schema of a run config (``streamtrain schema``)."""
    return RunConfig.model_json_schema()
