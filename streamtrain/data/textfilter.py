"""The text filter: a record's text, or the reason it has none; and the check of a run's first records.

``dataset.text_field`` names the field that holds the text. A dotted path (``meta.body``) reaches a nested field,
the way ``datasets``' ``flatten()`` names it; a record key that holds the dots itself (a column ``meta.body``) is
taken first when the record has it with a value. A text field holding bytes (a Parquet ``binary`` column) is
decoded with ``dataset.binary_encoding``.

A record without usable text is *filtered* for one reason, a field of ``checkpoint.FilterReasons``:

* ``missing``: the field is absent or null (``datasets`` fills a field absent from some records with null, so
  the two cannot be told apart);
* ``wrong_type``: the field holds no text (a dict, a list, a number...);
* ``undecodable``: the field holds bytes that ``binary_encoding`` cannot decode;
* ``too_short``: the text, stripped, is shorter than ``min_chars``.

A wrong ``text_field`` filters every record, so a run would "finish" having trained nothing, and be pinned to
the wrong value. ``FirstRecords`` watches the run's first ``FIRST_RECORDS`` raw records and stops the run before
anything is trained when none of them passes and the reasons point at the config.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..config import DatasetConfig
from ..errors import DatasetError

Reason = Literal["missing", "wrong_type", "too_short", "undecodable"]

#: How many of a run's first raw records decide whether its text field is usable. A wrong field shows in every
#: record, so a hundred tell it as surely as a thousand, and they are read in well under a second (a Parquet row
#: group, a fraction of a JSON block); a real dataset whose first hundred records all hold no text, and for the
#: wrong type, is implausible. The check costs nothing more: the stream reads these records anyway.
FIRST_RECORDS = 100

#: Listings in messages (fields of a record, keys of a dict) stop after this many entries.
_MAX_LISTED = 30


def field_value(record: Mapping[str, Any], path: str) -> Any:
    """The value of field ``path`` in ``record``; None when it is absent or null.

    The whole path as one key comes first (a flattened column ``meta.body``), when it holds a value; otherwise
    each split of the path at a dot, shortest first, names a field holding a mapping and the rest is looked up in
    it, by the same rule. A list is not descended into (``tags.0`` is no path).
    """
    value = record.get(path)
    if value is not None or "." not in path:
        return value
    parts = path.split(".")
    for i in range(1, len(parts)):
        inner = record.get(".".join(parts[:i]))
        if isinstance(inner, Mapping):
            found = field_value(inner, ".".join(parts[i:]))
            if found is not None:
                return found
    return None


def decode_bytes(value: bytes | bytearray | memoryview, encoding: str) -> str | None:
    """The text of a binary field value, or None when its bytes are not valid in ``encoding``."""
    try:
        return bytes(value).decode(encoding)
    except UnicodeError:
        return None


@dataclass(frozen=True)
class TextFilter:
    """The text of a record, by the rules of a DatasetConfig."""

    field: str
    min_chars: int
    encoding: str

    @classmethod
    def of(cls, dataset: DatasetConfig) -> TextFilter:
        return cls(dataset.text_field, dataset.min_chars, dataset.binary_encoding)

    def text(self, record: Mapping[str, Any]) -> tuple[str, None] | tuple[None, Reason]:
        """``(text, None)`` for a record that passes, ``(None, reason)`` for one that is filtered."""
        value = record.get(self.field)
        if value is None and "." in self.field:
            value = field_value(record, self.field)
        if isinstance(value, str):
            text = value
        elif value is None:
            return None, "missing"
        elif isinstance(value, (bytes, bytearray, memoryview)):
            decoded = decode_bytes(value, self.encoding)
            if decoded is None:
                return None, "undecodable"
            text = decoded
        else:
            return None, "wrong_type"
        if len(text.strip()) < self.min_chars:
            return None, "too_short"
        return text, None


# -- describing records in messages ------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    if isinstance(value, Mapping):
        return "dict"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes"
    return type(value).__name__


def leaf_paths(record: Mapping[str, Any], prefix: str = "", depth: int = 4) -> list[tuple[str, Any]]:
    """Every field of ``record`` as (dotted path, value), nested mappings opened (``depth`` levels)."""
    out: list[tuple[str, Any]] = []
    for key, value in record.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and depth > 0:
            out.extend(leaf_paths(value, path + ".", depth - 1))
        else:
            out.append((path, value))
    return out


def _listing(items: list[str]) -> str:
    shown = ", ".join(repr(i) for i in items[:_MAX_LISTED])
    return f"[{shown}{', ...' if len(items) > _MAX_LISTED else ''}]"


def text_paths(record: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted paths of ``record``'s fields that hold text (strings or bytes)."""
    return [p for p, v in leaf_paths(record, prefix) if isinstance(v, (str, bytes))]


# -- the run's first records --------------------------------------------------------------------------------


class FirstRecords:
    """Watches the first ``FIRST_RECORDS`` raw records of a run (a stream from raw index 0) and raises a
    DatasetError, before anything is trained, when none of them passes the filter and

    * some hold a value of the wrong type or undecodable bytes: the message names the field, the type found and
      what to set (for a dict, a dotted path into it, listing its keys); or
    * every one of them lacks the field: the message lists the fields the records have.

    Records filtered only as too short, or partly missing, stop nothing: a dataset may begin with blank lines.
    """

    def __init__(self, dataset: DatasetConfig) -> None:
        self.dataset = dataset
        self.seen = 0
        self.passed = False
        self.reasons: Counter[str] = Counter()
        self.types: Counter[str] = Counter()
        self.example: Any = None  # the first value of the wrong type
        self.last: Mapping[str, Any] = {}

    @property
    def watching(self) -> bool:
        return not self.passed and self.seen < FIRST_RECORDS

    def take(self, record: Mapping[str, Any], reason: Reason | None) -> None:
        """One more raw record, and its reason when filtered (raises at the last record watched)."""
        self.seen += 1
        self.last = record
        if reason is None:
            self.passed = True
            return
        self.reasons[reason] += 1
        if reason == "wrong_type":
            value = field_value(record, self.dataset.text_field)
            self.types[_type_name(value)] += 1
            if self.example is None:
                self.example = value
        if self.seen == FIRST_RECORDS:
            self.check()

    def check(self) -> None:
        """The verdict on the records seen (called at the last one watched, and at the end of a shorter stream)."""
        if self.passed or not self.seen:
            return
        if self.reasons["wrong_type"] or self.reasons["undecodable"]:
            raise DatasetError(self._wrong_type_message())
        if self.reasons["missing"] == self.seen:
            raise DatasetError(self._missing_message())

    def _counts(self) -> str:
        labels = {"missing": "missing the field", "wrong_type": "wrong type", "too_short": "too short",
                  "undecodable": "undecodable"}
        return ", ".join(f"{n} {labels[r]}" for r, n in self.reasons.most_common())

    def _head(self) -> str:
        return (f"dataset {self.dataset.path!r}: none of the first {self.seen} records has usable text in "
                f"text_field {self.dataset.text_field!r} ({self._counts()})")

    def _wrong_type_message(self) -> str:
        field, ds = self.dataset.text_field, self.dataset
        nothing = ("Nothing was trained, so the run is not tied to this config: train again with the corrected "
                   "config.")
        if not self.reasons["wrong_type"]:
            return (f"{self._head()}: the field holds bytes that do not decode as {ds.binary_encoding!r}.\n"
                    "What to do: set dataset.binary_encoding to the encoding of those bytes (e.g. 'latin-1', "
                    f"'cp1252', 'utf-16'). {nothing}")
        kind, n = self.types.most_common(1)[0]
        found = f"it holds {'an' if kind[0] in 'aeiou' else 'a'} {kind} in {n} of them"
        example = self.example
        if isinstance(example, Mapping):
            keys = [str(k) for k in example]
            inner = text_paths(example, f"{field}.")
            found += f", with the keys {_listing(keys)}"
            if inner:
                todo = (f"set dataset.text_field to the dotted path of the nested field that holds the text: "
                        f"{inner[0]!r}" + (f" (those holding text: {_listing(inner)})" if len(inner) > 1 else ""))
            else:
                todo = (f"set dataset.text_field to a dotted path into it ('{field}.<key>') reaching the text; "
                        "none of its keys holds a string in the first such record")
        elif isinstance(example, (list, tuple)):
            todo = ("streamtrain trains one text per record: set dataset.text_field to a field that holds a "
                    "string, or join the list into one text field first (e.g. with datasets' map, saved as new "
                    "data files)")
        else:
            todo = "set dataset.text_field to the field that holds the text"
        others = [p for p in text_paths(self.last) if p != field and not p.startswith(f"{field}.")]
        if others and not isinstance(example, Mapping):
            todo += f"; the records' fields holding text: {_listing(others)}"
        return f"{self._head()}: {found}, not text.\nWhat to do: {todo}. {nothing}"

    def _missing_message(self) -> str:
        fields = [p for p, _ in leaf_paths(self.last)]
        return (f"dataset {self.dataset.path!r} has no text field {self.dataset.text_field!r}: it is absent (or "
                f"null) in all of the first {self.seen} records read. The records have the fields "
                f"{_listing(fields)}; set dataset.text_field to the one holding the text (a dotted path such as "
                "'meta.body' reaches a nested field).")
