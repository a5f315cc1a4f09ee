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
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from typing import Any

from ..config import DatasetConfig
from ..errors import DataEndsEarly, DatasetError
from .datafiles import open_failure_message
from .readerror import describe_read_error
from .textfilter import FirstRecords, Reason, TextFilter

logger = logging.getLogger(__name__)

_STATE_FORMAT = "streamtrain.stream/1"  # a tag inside checkpoints, not this module's path: it stays as saved


def _open(cfg: DatasetConfig) -> Any:
    import datasets

    try:
        # load_kwargs never holds the arguments named here (the config refuses them), so none is passed twice.
        return datasets.load_dataset(
            cfg.path, cfg.name, data_files=cfg.data_files, split=cfg.split, revision=cfg.revision, streaming=True,
            **cfg.load_kwargs,
        )
    except Exception as exc:  # the one boundary where datasets' many exception types become ours
        raise DatasetError(open_failure_message(cfg, exc)) from exc


def _close(source: Iterator[Any]) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        close()


def count_records(cfg: DatasetConfig, limit: int) -> int:
    """The number of raw records of the dataset, counted up to ``limit`` (the Parquet metadata, when that tells)."""
    from .datafiles import dataset_size, describe_dataset

    size = dataset_size(describe_dataset(cfg))
    if size is not None:
        return min(size, limit)
    n = 0
    for batch in _open(cfg).iter(batch_size=1024):
        n += len(next(iter(batch.values()), []))
        if n >= limit:
            return limit
    return n


class DatasetStream:
    """Iterate ``(raw_index, text)`` of the records that pass the filter, from raw offset ``start``.

    A stream from a raw offset above 0 proves that the data reaches it: resumed by ``.skip``, it skips one record
    less and reads that one; resumed from a state, an empty stream is checked the same way, unless the caller knows
    the data ended there (``ends_at_start``). Data that ends before ``start`` raises ``DataEndsEarly``.

    Attributes:
        position: raw index of the next raw record to read (== number of raw records before it).
        filtered: records read but not yielded; ``reasons``: how many for each reason (``textfilter.py``).
        resumed_by: how the start offset was reached: "start" (offset 0), "skip" or "state_dict".
    """

    def __init__(self, dataset: DatasetConfig, start: int = 0, state_dict: dict[str, Any] | None = None,
                 stop: int | None = None, *, on_filtered: Callable[[int, Reason], None] | None = None,
                 first_records_check: bool = True, ends_at_start: bool = False) -> None:
        if start < 0:
            raise ValueError("start must be >= 0")
        # Reading stops before raw index `stop`, so a run that ends at its max_samples stands exactly there.
        self.stop = stop
        self.config = dataset
        self.text_filter = TextFilter.of(dataset)
        self.start = start
        self.position = start
        self.filtered = 0
        self.reasons: Counter[Reason] = Counter()
        self.on_filtered = on_filtered  # told of each filtered record, in raw order: (raw index, reason)
        # the run's first records decide whether its text field is usable: only a stream from raw 0 sees them
        self.first_records = FirstRecords(dataset) if first_records_check and start == 0 else None
        self.ends_at_start = ends_at_start
        self._initial_state: dict[str, Any] | None = None
        self._source: Iterator[dict[str, Any]] | None = None  # the raw records from `position`, once opened
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
        return self._skipping(raw, start)

    @staticmethod
    def _skipping(raw: Any, start: int) -> tuple[Any, int, str]:
        """The raw stream one record before ``start`` (read, then, to prove the data reaches ``start``)."""
        if start == 0:
            return raw, 0, "start"
        return (raw.skip(start - 1) if start > 1 else raw), start - 1, "skip"

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

        if self._source is None or self.position == self.start:
            # datasets only tracks its state once iteration began, and a state-resumed stream may have read its
            # first record ahead: at the start the exact state is the one it was resumed from (if any)
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
        elif self._source is not None:
            _close(self._source)

    def __enter__(self) -> DatasetStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> None:
        """Open the raw records at ``start`` now (iteration does it otherwise): a stored state that does not fit
        falls back to ``.skip``, and data that ends before ``start`` raises ``DataEndsEarly``."""
        if self._source is not None:
            return
        source = iter(self._ds)
        head: list[dict[str, Any]] = []
        if self.resumed_by == "state_dict":
            # datasets applies a loaded state lazily, at the first read: a state that does not fit fails only here.
            try:
                head = [next(source)]
            except StopIteration:
                if not self.ends_at_start:  # nothing at `start`: prove the data reaches it at least
                    _close(source)
                    before = iter(self._skipping(_open(self.config), self.start)[0])
                    self._read_record_before_start(before)
                    _close(before)
            except Exception as exc:
                logger.warning("stored stream state failed (%s); skipping %d raw records instead", exc, self.start)
                _close(source)
                self._ds, self._skip, self.resumed_by = self._skipping(_open(self.config), self.start)
                source = iter(self._ds)
        if self.resumed_by == "skip":
            self._read_record_before_start(source)
        self._source = itertools.chain(head, source)

    def _read_record_before_start(self, source: Iterator[dict[str, Any]]) -> None:
        """Read the record just before ``start`` from ``source`` (standing there); when there is none, raise
        DataEndsEarly, naming where the data ends."""
        try:
            next(source)
        except StopIteration:
            _close(source)
            end = count_records(self.config, self.start)
            raise DataEndsEarly(
                f"dataset {self.config.path!r} ends at raw position {end} (it holds {end} records), before raw "
                f"position {self.start}, where reading was to start",
                position=self.start, end=end) from None
        except Exception as exc:
            raise DatasetError(describe_read_error(self.config, exc, self.start - 1)) from exc

    def _records(self) -> Generator[tuple[int, str], None, None]:
        self.open()
        assert self._source is not None
        try:
            yield from self._filter(self._source)
        finally:
            _close(self._source)

    def _filter(self, source: Iterator[dict[str, Any]]) -> Iterator[tuple[int, str]]:
        text_of, first, told = self.text_filter.text, self.first_records, self.on_filtered
        while self.stop is None or self.position < self.stop:
            try:
                example = next(source)
            except StopIteration:
                break
            except Exception as exc:
                raise DatasetError(
                    describe_read_error(self.config, exc, self.position)) from exc
            index = self.position
            self.position += 1
            text, reason = text_of(example)
            if first is not None:
                if first.watching:
                    first.take(example, reason)
                else:
                    first = None  # decided: the rest of the stream is not watched
            if reason is not None:
                self.filtered += 1
                self.reasons[reason] += 1
                if told is not None:
                    told(index, reason)
                continue
            assert text is not None
            yield index, text
        if self.first_records is not None and self.first_records.watching:
            self.first_records.check()  # a stream shorter than the records watched
