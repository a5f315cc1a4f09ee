"""Knowledge bases in memory for predictions: parsed patterns and the symbol -> pattern index.

A KBIndex is loaded from the store on a node's first prediction, then kept current by the engine's learns; it is
dropped on clear-all and on any rollback (it may hold uncommitted patterns)."""

from __future__ import annotations

import json
from itertools import chain
from sys import intern

import numpy as np

from streamtrain.server.store import Store

_MAX_LOADED_PATTERNS = 2_000_000     # patterns kept in memory over all loaded knowledge bases


class KBIndex:
    """One knowledge base: names, events, flattened symbols and the symbol -> pattern positions index."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.events: list[list[list[str]]] = []
        self.flats: list[list[str]] = []
        self.by_symbol: dict[str, list[int]] = {}
        self.pos: dict[str, int] = {}
        self._lens: np.ndarray | None = None

    def add(self, name: str, events: list[list[str]]) -> int:
        i = self.pos.get(name)
        if i is not None:
            return i
        i = self.pos[name] = len(self.names)
        ev = [[intern(sym) for sym in e] for e in events]      # shared strings: less memory
        flat = list(chain.from_iterable(ev))
        self.names.append(name)
        self.events.append(ev)
        self.flats.append(flat)
        self._lens = None
        for sym in set(flat):
            self.by_symbol.setdefault(sym, []).append(i)
        return i

    def lens(self) -> np.ndarray:
        if self._lens is None or len(self._lens) != len(self.flats):
            self._lens = np.fromiter((len(f) for f in self.flats), dtype=np.float64, count=len(self.flats))
        return self._lens

    @classmethod
    def load(cls, store: Store, kb: str) -> KBIndex:
        idx = cls()
        for name, pd in store.iter_patterns(kb):
            idx.add(name, json.loads(pd))
        return idx


class KBIndexes:
    """The loaded KBIndex of each knowledge base, least recently used dropped beyond a size cap."""

    def __init__(self) -> None:
        self.loaded: dict[str, KBIndex] = {}

    def get(self, store: Store, kb: str) -> KBIndex:
        idx = self.loaded.pop(kb, None)
        if idx is None:
            idx = KBIndex.load(store, kb)
        self.loaded[kb] = idx            # most recently used last
        total = sum(len(x.names) for x in self.loaded.values())
        while total > _MAX_LOADED_PATTERNS and len(self.loaded) > 1:
            oldest = next(iter(self.loaded))
            total -= len(self.loaded.pop(oldest).names)
        return idx

    def on_learn(self, kb: str, name: str, events: list[list[str]]) -> None:
        idx = self.loaded.get(kb)
        if idx is not None:
            idx.add(name, events)

    def drop(self, kb: str | None = None) -> None:
        if kb is None:
            self.loaded.clear()
        else:
            self.loaded.pop(kb, None)
