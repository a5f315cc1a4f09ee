"""KATO's naming rules, shared by the client (to know a learn's name without its answer) and the server.

A pattern is a list of events; an event is a list of symbols sorted in code-point order. Its name is
``"PTRN|" + sha1(repr(events))``: Python's repr, so quoting follows Python's rules (kato-api.md §5.4).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

PREFIX = "PTRN|"
_UNSAFE = re.compile(r"[/\\.\"$*<>:|? -]")


def sort_event(symbols: Sequence[str]) -> list[str]:
    """An event as KATO stores it: symbols sorted, duplicates kept."""
    return sorted(symbols)


def pattern_hash(events: Sequence[Sequence[str]]) -> str:
    """The bare sha1 name KATO stores (events must already be sorted)."""
    return list_hash([list(e) for e in events])  # the repr of lists, whatever sequences came in (a tuple's differs)


def list_hash(events: list[list[str]]) -> str:
    """pattern_hash of events that are a list of lists already (the planner's and the server's): no copy."""
    return hashlib.sha1(repr(events).encode("utf-8")).hexdigest()


def pattern_name(events: Sequence[Sequence[str]]) -> str:
    """The name a learn of these (sorted) events returns, or "" when they hold fewer than 2 symbols."""
    if sum(len(e) for e in events) < 2:
        return ""
    return PREFIX + pattern_hash(events)


def strip_prefix(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def kb_id(node_id: str, service_name: str = "kato") -> str:
    """KATO's knowledge-base id of a node (processor_manager.py:66-107): note a-b and a_b share one."""
    base = service_name.replace("-", "_")
    safe = _UNSAFE.sub("_", node_id)
    kid = f"{safe}_{base}"
    if len(kid) > 60:
        kid = f"{safe[: 60 - len(base) - 10]}_{hashlib.md5(safe.encode()).hexdigest()[:8]}_{base}"
    return kid
