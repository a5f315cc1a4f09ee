"""The sample stream: a streamed ``datasets`` dataset read from a raw offset, filtered here, in order.

Positions are always counted in *raw* records (filtered ones included), and the offset is applied to the raw
stream before any filtering: that is what makes a resume exact. (Counting in filtered samples and skipping
in raw ones is the bug that trained samples twice in the systems streamtrain replaces.)

Two ways to start at raw offset ``n``:

* ``.skip(n)`` on the raw stream: always correct, but reads and discards ``n`` records.
* ``load_state_dict(state)`` with a state taken from a stream at exactly position ``n``: the ``datasets``
  library then skips whole shards and Arrow tables without decoding them, which is far cheaper at large
  offsets (see ``benchmarks/bench_stream.py``). A state is only exact when taken at the position it is used
  for, so :meth:`DatasetStream.state_for` returns one only for the stream's current position; a checkpoint
  written while samples are in flight stores ``None`` and resumes by ``.skip``.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Generator, Iterator
from typing import Any

from .config import DatasetConfig
from .errors import DatasetError

logger = logging.getLogger(__name__)

#: When the text field is absent from every one of this many first records, the config is wrong.
PROBE_RECORDS = 100

_STATE_FORMAT = "streamtrain.stream/1"
_BUILDERS = {"parquet", "json", "csv", "text", "arrow", "webdataset", "imagefolder", "audiofolder"}


def _open(cfg: DatasetConfig) -> Any:
    import datasets

    try:
        # load_kwargs never holds the arguments named here (the config refuses them), so none is passed twice.
        return datasets.load_dataset(
            cfg.path, cfg.name, data_files=cfg.data_files, split=cfg.split, revision=cfg.revision, streaming=True,
            **cfg.load_kwargs,
        )
    except Exception as exc:  # the one boundary where datasets' many exception types become ours
        raise DatasetError(_open_failure_message(cfg, exc)) from exc


def _open_failure_message(cfg: DatasetConfig, exc: Exception) -> str:
    what = f"cannot open dataset path={cfg.path!r}"
    if cfg.name:
        what += f" name={cfg.name!r}"
    if cfg.data_files is not None:
        what += f" data_files={cfg.data_files!r}"
    what += f" split={cfg.split!r}"
    if cfg.revision is not None:
        what += f" revision={cfg.revision!r}"
    if cfg.load_kwargs:
        what += f" load_kwargs={cfg.load_kwargs!r}"
    what += f": {type(exc).__name__}: {exc}"
    if cfg.path in _BUILDERS:
        todo = (
            "check that data_files points at existing local files (in a run config file, relative paths are "
            "relative to the file's folder; in Python, to the working folder), that split names a split they "
            "provide, and that load_kwargs holds only arguments this builder takes"
        )
    else:
        todo = (
            "check the dataset name and config; if it is on the Hugging Face Hub, this machine must reach the hub "
            "(unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or have it in the local cache; for local files use a "
            "builder such as path='parquet' with data_files"
        )
    return f"{what}\nWhat to do: {todo}."


def _close(source: Iterator[Any]) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        close()


class DatasetStream:
    """Iterate ``(raw_index, text)`` of the records that pass the filter, from raw offset ``start``.

    Attributes:
        position: raw index of the next raw record to read (== number of raw records before it).
        filtered: records read but not yielded (no text field, not a string, or too short).
        resumed_by: how the start offset was reached: "start" (offset 0), "skip" or "state_dict".
    """

    def __init__(self, dataset: DatasetConfig, start: int = 0, state_dict: dict[str, Any] | None = None,
                 stop: int | None = None) -> None:
        if start < 0:
            raise ValueError("start must be >= 0")
        # Reading stops before raw index `stop`, so a run that ends at its max_samples stands exactly there.
        self.stop = stop
        self.config = dataset
        self.start = start
        self.position = start
        self.filtered = 0
        self._missing = 0  # records of this stream so far without the text field (probe)
        self._seen = 0
        self._initial_state: dict[str, Any] | None = None
        self._ds, self._skip, self.resumed_by = self._prepare(start, state_dict)
        self._it: Generator[tuple[int, str], None, None] | None = None

    def _prepare(self, start: int, state: dict[str, Any] | None) -> tuple[Any, int, str]:
        raw = _open(self.config)
        if state is not None:
            reason = self._state_problem(state, start)
            if reason is None:
                ds = raw.skip(state["skip"]) if state["skip"] else raw
                try:
                    ds.load_state_dict(copy.deepcopy(state["datasets_state"]))
                    self._initial_state = copy.deepcopy(state)
                    return ds, state["skip"], "state_dict"
                except Exception as exc:  # a state that does not fit this dataset: .skip is always correct
                    reason = f"load_state_dict failed: {exc}"
                    raw = _open(self.config)
            logger.warning("stored stream state not used (%s); skipping %d raw records instead", reason, start)
        if start == 0:
            return raw, 0, "start"
        return raw.skip(start), start, "skip"

    @staticmethod
    def _state_problem(state: dict[str, Any], start: int) -> str | None:
        import datasets

        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            return "unknown state format"
        if state.get("raw_offset") != start:
            return f"state is for raw offset {state.get('raw_offset')}, not {start}"
        if state.get("datasets_version") != datasets.__version__:
            return f"state from datasets {state.get('datasets_version')}, this is datasets {datasets.__version__}"
        if not isinstance(state.get("skip"), int) or not isinstance(state.get("datasets_state"), dict):
            return "incomplete state"
        return None

    # -- resume state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any] | None:
        """An exact, JSON-able state for the current ``position`` (pass it back as ``state_dict=`` with
        ``start=position``), or None when there is nothing better than ``.skip``."""
        import datasets

        if self._it is None:
            # datasets only tracks its state once iteration began; before that the exact state is the one we
            # were resumed from (if any).
            return copy.deepcopy(self._initial_state) if self.resumed_by == "state_dict" else None
        return {
            "format": _STATE_FORMAT,
            "datasets_version": datasets.__version__,
            "raw_offset": self.position,
            "skip": self._skip,
            "datasets_state": self._ds.state_dict(),
        }

    def state_for(self, raw_offset: int) -> dict[str, Any] | None:
        """The exact state for ``raw_offset`` if the stream stands there now, else None (resume by ``.skip``)."""
        return self.state_dict() if raw_offset == self.position else None

    # -- iteration -------------------------------------------------------------------------------------------

    def __iter__(self) -> DatasetStream:
        return self

    def __next__(self) -> tuple[int, str]:
        if self._it is None:
            self._it = self._records()
        return next(self._it)

    def close(self) -> None:
        """Stop reading: closes the dataset's file readers now rather than at garbage collection."""
        if self._it is not None:
            self._it.close()

    def __enter__(self) -> DatasetStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _records(self) -> Generator[tuple[int, str], None, None]:
        source = iter(self._ds)
        head: list[dict[str, Any]] = []
        if self.resumed_by == "state_dict":
            # datasets applies a loaded state lazily, at the first read: a state that does not fit fails only here.
            try:
                head = [next(source)]
            except StopIteration:
                pass
            except Exception as exc:
                logger.warning("stored stream state failed (%s); skipping %d raw records instead", exc, self.start)
                _close(source)
                raw = _open(self.config)
                self._ds, self._skip, self.resumed_by = (raw.skip(self.start), self.start, "skip") if self.start else (raw, 0, "start")
                source = iter(self._ds)
        try:
            yield from self._filter(itertools.chain(head, source))
        finally:
            _close(source)

    def _filter(self, source: Iterator[dict[str, Any]]) -> Iterator[tuple[int, str]]:
        field, min_chars = self.config.text_field, self.config.min_chars
        while self.stop is None or self.position < self.stop:
            try:
                example = next(source)
            except StopIteration:
                break
            except Exception as exc:
                raise DatasetError(
                    f"reading dataset {self.config.path!r} failed at raw record {self.position}: "
                    f"{type(exc).__name__}: {exc}\nWhat to do: check that the data files are complete and "
                    "readable; the run can resume from its last checkpoint once they are."
                ) from exc
            index = self.position
            self.position += 1
            text = example.get(field)
            if self._seen < PROBE_RECORDS:
                self._probe(example, field not in example)
            if not isinstance(text, str) or len(text.strip()) < min_chars:
                self.filtered += 1
                continue
            yield index, text
        if 0 < self._seen < PROBE_RECORDS and self._missing == self._seen:
            self._raise_missing_field(example)

    def _probe(self, example: dict[str, Any], missing: bool) -> None:
        self._seen += 1
        self._missing += missing
        if self._seen == PROBE_RECORDS and self._missing == PROBE_RECORDS:
            self._raise_missing_field(example)

    def _raise_missing_field(self, example: dict[str, Any]) -> None:
        fields = sorted(example)
        raise DatasetError(
            f"dataset {self.config.path!r} has no text field {self.config.text_field!r}: it is absent "
            f"from all of the first {self._seen} records read. The records have the fields {fields}; set "
            "dataset.text_field to the one holding the text."
        )
