"""Predictions as KATO 3.10.1 computes them (kato-api.md §5.6), without scanning the whole knowledge base.

Candidates come from the symbol index: a pattern sharing no symbol with the STM has LCS 0, hence
similarity 0, so with recall_threshold > 0 it can never qualify. With recall_threshold == 0 every
pattern qualifies and all are scored.
"""

from __future__ import annotations

import difflib
import hashlib
import heapq
import json
import logging
from collections import Counter
from functools import reduce
from itertools import chain
from math import log, log2, log10, sqrt
from operator import add
from sys import intern
from typing import TYPE_CHECKING, Any

import numpy as np
from rapidfuzz import fuzz, process
from rapidfuzz.distance import LCSseq

if TYPE_CHECKING:
    from streamtrain.server.engine import Engine

logger = logging.getLogger(__name__)

_SQL_CHUNK = 500
_MAX_LOADED_PATTERNS = 2_000_000     # patterns kept in memory over all loaded knowledge bases


class KBIndex:
    """One knowledge base in memory for predictions: parsed patterns and the symbol -> pattern index.

    Loaded from SQLite (patterns + symbol_index) on a node's first prediction, then kept current by
    Engine.learn_events; dropped on clear-all and on any rollback (it may hold uncommitted patterns)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.events: list[list[list[str]]] = []
        self.flats: list[list[str]] = []
        self.by_symbol: dict[str, list[int]] = {}
        self.pos: dict[str, int] = {}
        self._lens: np.ndarray | None = None

    def add(self, name: str, events: list[list[str]], *, index_symbols: bool = True) -> int:
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
        if index_symbols:
            for sym in set(flat):
                self.by_symbol.setdefault(sym, []).append(i)
        return i

    def lens(self) -> np.ndarray:
        if self._lens is None or len(self._lens) != len(self.flats):
            self._lens = np.fromiter((len(f) for f in self.flats), dtype=np.float64, count=len(self.flats))
        return self._lens

    @classmethod
    def load(cls, engine: "Engine", kb: str) -> "KBIndex":
        idx = cls()
        conn = engine.store.conn
        for name, pd in conn.execute("SELECT name, pattern_data FROM patterns WHERE kb_id=? ORDER BY name", (kb,)):
            idx.add(name, json.loads(pd), index_symbols=False)
        for sym, name in conn.execute("SELECT symbol, name FROM symbol_index WHERE kb_id=?", (kb,)):
            i = idx.pos.get(name)
            if i is not None:
                idx.by_symbol.setdefault(intern(sym), []).append(i)
        return idx


class KBIndexes:
    """The loaded KBIndex of each knowledge base, least recently used dropped beyond a size cap."""

    def __init__(self) -> None:
        self.loaded: dict[str, KBIndex] = {}

    def get(self, engine: "Engine", kb: str) -> KBIndex:
        idx = self.loaded.pop(kb, None)
        if idx is None:
            idx = KBIndex.load(engine, kb)
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


# ---------------------------------------------------------------------------------------- metrics
def _expectation(p: float, num_symbols: int) -> float:
    if p > 0 and num_symbols > 1:
        return -p * log(p, num_symbols)
    return 0


def _normalized_entropy(symbols: list[str], total_symbols: int) -> float:
    if not symbols:
        return 0.0
    n = len(symbols)
    return sum([_expectation(c / n, total_symbols) for c in Counter(symbols).values()])


def _global_normalized_entropy(symbols: list[str], probs: dict[str, float], total_symbols: int) -> float:
    return sum([_expectation(probs.get(s, 0), total_symbols) for s in set(symbols)])


def _conditional_probability(symbols: list[str], probs: dict[str, float]) -> float:
    logs = []
    for s in symbols:
        p = probs.get(s, 1e-10)
        logs.append(log10(p) if p > 0 else log10(1e-10))
    return 10 ** reduce(add, logs) if logs else 0


def _average_emotives(record: list[dict[str, float]]) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for bunch in record:
        for e, v in bunch.items():
            acc.setdefault(e, []).append(v)
    return {e: float(sum(v) / len(v)) if v else 0.0 for e, v in acc.items()}


def _hash_future(future: list[list[str]]) -> str:
    return hashlib.sha1(json.dumps([sorted(e) for e in future], sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------- matching
def matching_blocks(a: list[str], b2j: dict[str, list[int]], lb: int) -> list[tuple[int, int, int]]:
    """difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks() without the terminator,
    with b's index (b2j) built once per query: KATO's extractor is difflib's algorithm without junk."""
    queue = [(0, len(a), 0, lb)]
    found = []
    while queue:
        alo, ahi, blo, bhi = queue.pop()
        besti, bestj, bestsize = alo, blo, 0
        j2len: dict[int, int] = {}
        for i in range(alo, ahi):
            newj2len: dict[int, int] = {}
            for j in b2j.get(a[i], ()):
                if j < blo:
                    continue
                if j >= bhi:
                    break
                k = newj2len[j] = j2len.get(j - 1, 0) + 1
                if k > bestsize:
                    besti, bestj, bestsize = i - k + 1, j - k + 1, k
            j2len = newj2len
        if bestsize:
            found.append((besti, bestj, bestsize))
            if alo < besti and blo < bestj:
                queue.append((alo, besti, blo, bestj))
            if besti + bestsize < ahi and bestj + bestsize < bhi:
                queue.append((besti + bestsize, ahi, bestj + bestsize, bhi))
    found.sort()
    blocks = []
    i1 = j1 = k1 = 0
    for i2, j2, k2 in found:
        if i1 + k1 == i2 and j1 + k1 == j2:
            k1 += k2
        else:
            if k1:
                blocks.append((i1, j1, k1))
            i1, j1, k1 = i2, j2, k2
    if k1:
        blocks.append((i1, j1, k1))
    return blocks


def alignment_blocks(flat: list[str], b2j: dict[str, list[int]], lb: int, lcs: int | None) -> list[tuple[int, int, int]]:
    """matching_blocks(), short-cut when the LCS is known to be 1 (most candidates of a large node): then
    difflib's single block is the first pattern symbol that occurs in the state, at its first position."""
    if lcs == 1:
        for i, sym in enumerate(flat):
            js = b2j.get(sym)
            if js:
                return [(i, js[0], 1)]
    return matching_blocks(flat, b2j, lb)


def reference_alignment(flat: list[str], state: list[str], cutoff: float):
    """Alignment of one pattern with the state, ported directly from pattern_search.extract_prediction_info
    with difflib (slow; the tests check predict()'s fast alignment against it)."""
    sm = difflib.SequenceMatcher(None, flat, state, autojunk=False)
    blocks = sm.get_matching_blocks()[:-1]
    matches: list[str] = []
    for _i, j, n in blocks:
        matches += state[j:j + n]
    if len(blocks) >= 2:
        i0, _, _ = blocks[0]
        i1, _, n1 = blocks[-1]
        past = flat[:i0]
        present = flat[i0:i1 + n1] if i1 + n1 > i0 else flat[i0:]
    elif len(blocks) == 1:
        i0, _, n0 = blocks[0]
        past = flat[:i0]
        present = flat[i0:i0 + n0]
    else:
        if cutoff > 0.0:
            return None
        past, present = [], flat
    missing: list[str] = []
    extras: list[str] = []
    if present:
        sm2 = difflib.SequenceMatcher(None, present, state, autojunk=False)
        for tag, alo, ahi, blo, bhi in sm2.get_opcodes():
            if tag in ("replace", "delete"):
                missing += present[alo:ahi]
            if tag in ("replace", "insert"):
                extras += state[blo:bhi]
    return matches, past, present, missing, extras, len(blocks)


def _prediction(name: str, events: list[list[str]], frequency: int, emotives: Any, matches: list[str],
                past_len: int, present_len: int, total_extras: int, similarity: float,
                number_of_blocks: int, stm_events: list[list[str]], length: int) -> dict[str, Any]:
    """representations/prediction.py: re-segment into the pattern's events, event-aligned missing/extras.

    past_len/present_len: symbols in the flat past/present; total_extras: state symbols the flat present
    does not match (the snr's e)."""
    m = len(matches)
    denom = 2.0 * m + total_extras
    snr = float((2.0 * m - total_extras) / denom) if denom > 0 else 0.0
    c1, c2, ev = past_len, 0, 0
    while c2 < c1:
        c2 += len(events[ev])
        ev += 1
    e1 = ev
    past = events[:ev]
    c1 += present_len
    while c2 < c1:
        c2 += len(events[ev])
        ev += 1
    present = events[e1:ev]
    future = events[ev:]
    if past and matches and matches[0] in past[-1]:
        present = [past[-1]] + present
        past = past[:-1]
    match_set = set(matches)
    missing = [[s for s in e if s not in match_set] for e in present]
    present_set = set(chain.from_iterable(present))
    extras = [[s for s in e if s not in present_set] for e in stm_events]
    present_len = sum(len(e) for e in present)
    return {
        "type": "prototypical", "name": name, "frequency": frequency, "emotives": emotives,
        "matches": matches, "past": past, "present": present, "missing": missing, "extras": extras,
        "anomalies": [], "potential": 0.0,
        "evidence": float(m / length) if length > 0 else 0.0,
        "similarity": similarity, "fragmentation": float(number_of_blocks - 1), "snr": snr,
        "confluence": 0.0, "predictive_information": 0.0, "sequence": events, "future": future,
        "confidence": float(m / present_len) if present_len > 0 else 0.0,
        "weighted_similarity": None, "weighted_evidence": None, "weighted_confidence": None, "weighted_snr": None,
    }


def _frag_term(frag: float) -> float:
    # KATO 3.10.1 divides by zero here (fragmentation -1: no matching block, only at threshold 0).
    return 0.0 if frag == -1 else 1.0 / (frag + 1)


def _kb_stats(engine: "Engine", kb: str) -> tuple[int, int, int]:
    c = engine.store.conn
    row = c.execute("SELECT unique_patterns, total_pattern_frequencies FROM kbs WHERE kb_id=?", (kb,)).fetchone()
    total_symbols = c.execute("SELECT COUNT(*) FROM symbols WHERE kb_id=?", (kb,)).fetchone()[0]
    return (row[0] if row else 0), (row[1] if row else 0), total_symbols


def _pmf(engine: "Engine", kb: str, symbols: set[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    syms = sorted(symbols)
    for i in range(0, len(syms), _SQL_CHUNK):
        part = syms[i:i + _SQL_CHUNK]
        q = f"SELECT symbol, pmf FROM symbols WHERE kb_id=? AND symbol IN ({','.join('?' * len(part))})"
        out.update(engine.store.conn.execute(q, (kb, *part)).fetchall())
    return out


def _details(engine: "Engine", kb: str, names: list[str]) -> dict[str, tuple[int, list]]:
    out: dict[str, tuple[int, list]] = {}
    for i in range(0, len(names), _SQL_CHUNK):
        part = names[i:i + _SQL_CHUNK]
        q = f"SELECT name, frequency, emotives FROM patterns WHERE kb_id=? AND name IN ({','.join('?' * len(part))})"
        for name, freq, emo in engine.store.conn.execute(q, (kb, *part)):
            out[name] = (freq, json.loads(emo))
    return out


# ---------------------------------------------------------------------------------------- entry point
def predict(engine: "Engine", kb: str, stm: list[list[str]], *, recall_threshold: float, max_predictions: int,
            use_token_matching: bool, use_index: bool = True, early_stop: bool = True
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(predictions, future_potentials) for this STM against knowledge base `kb`.

    use_index=False scores every pattern of the node and early_stop=False aligns every qualifying
    candidate: same answer, slower (the benchmark and the tests compare them)."""
    state = list(chain.from_iterable(stm))
    if not state:
        return [], []
    if len(state) == 1:
        return _single_symbol(engine, kb, state[0], max_predictions), []

    idx = engine.kb_index.get(engine, kb)
    threshold = recall_threshold
    if use_index and threshold > 0:
        chosen: set[int] = set()
        for sym in set(state):
            chosen.update(idx.by_symbol.get(sym, ()))
        cand = np.fromiter(chosen, dtype=np.int64, count=len(chosen))
    else:
        cand = np.arange(len(idx.names), dtype=np.int64)
    if not len(cand):
        return [], []
    cut = threshold * 100.0 - 1e-6
    b2j: dict[str, list[int]] = {}
    for j, sym in enumerate(state):
        b2j.setdefault(sym, []).append(j)
    ls = len(state)
    limit = max_predictions * 3
    flats = idx.flats
    if use_token_matching:
        # Same float operations as KATO's per-pattern 2.0*LCS/(len_p+len_s)*100.0, vectorized.
        lcs = process.cdist([state], [flats[i] for i in cand], scorer=LCSseq.similarity, dtype=np.int64,
                            workers=1)[0].astype(np.float64)
        score = 2.0 * lcs / (idx.lens()[cand] + ls) * 100.0
    else:
        lcs = idx.lens()[cand]            # no cheap bound in character mode
        score = np.array([fuzz.ratio(" ".join(flats[i]), " ".join(state)) for i in cand], dtype=np.float64)
    keep = score >= cut
    q_idx, q_lcs, q_score = cand[keep], lcs[keep], score[keep]
    will_prune = len(q_idx) > limit
    # Upper bound of each candidate's pruning key (evidence + confidence) * snr + 1/(fragmentation + 1)
    # from its LCS L: matched symbols m <= L and snr = (3m - ls)/(m + ls) rises with m; evidence <= L/len,
    # confidence <= 1, and when even the best snr is negative, evidence + confidence >= 2/len (m >= 1);
    # the fragmentation term is at most 1.
    q_len = idx.lens()[q_idx]
    snr_max = (3.0 * q_lcs - ls) / (q_lcs + ls)
    bound = np.where(snr_max >= 0, (q_lcs / q_len + 1.0) * snr_max, 2.0 / q_len * snr_max) + 1.0
    # Align the most promising first: once `limit` keys are in hand, a candidate whose bound is below the
    # smallest of them can never survive the pruning, and neither can any after it.
    order = np.argsort(-bound, kind="stable") if will_prune else np.arange(len(q_idx))
    heap: list[float] = []
    scored = []      # every aligned candidate: alignment and pruning key only
    for k in order.tolist():
        if early_stop and will_prune and len(heap) >= limit and bound[k] + 1e-9 < heap[0]:
            break
        i = int(q_idx[k])
        name, events, flat = idx.names[i], idx.events[i], flats[i]
        sim = float(q_score[k]) / 100.0
        lcs_k = int(q_lcs[k])
        blocks = alignment_blocks(flat, b2j, ls, lcs_k if use_token_matching else None)
        if blocks:
            i0 = blocks[0][0]
            end = blocks[-1][0] + blocks[-1][2]
            past_len, present_len = i0, (end - i0 if end > i0 else len(flat) - i0)
        elif threshold > 0.0:
            continue
        else:
            past_len, present_len = 0, len(flat)
        m = sum(b[2] for b in blocks)
        # Aligning the flat present with the state again (KATO's compare()) matches the same m symbols:
        # every other state symbol is an extra.
        extras = ls - m
        denom = 2.0 * m + extras
        snr = float((2.0 * m - extras) / denom) if denom > 0 else 0.0
        c2 = ev = 0
        while c2 < past_len:
            c2 += len(events[ev])
            ev += 1
        e1 = ev
        while c2 < past_len + present_len:
            c2 += len(events[ev])
            ev += 1
        if e1 > 0 and blocks and state[blocks[0][1]] in events[e1 - 1]:
            e1 -= 1
        present_sym = sum(len(events[k]) for k in range(e1, ev))
        evidence = float(m / len(flat)) if flat else 0.0
        confidence = float(m / present_sym) if present_sym > 0 else 0.0
        pre = (evidence + confidence) * snr + _frag_term(float(len(blocks) - 1))
        scored.append((pre, name, events, flat, sim, blocks, past_len, present_len, extras))
        if will_prune:
            if len(heap) < limit:
                heapq.heappush(heap, pre)
            elif pre > heap[0]:
                heapq.heapreplace(heap, pre)
    if not scored:
        return [], []

    pruned = will_prune
    if pruned:
        scored = heapq.nsmallest(limit, scored, key=lambda t: (-t[0], t[1]))
    else:
        scored.sort(key=lambda t: t[1])     # deterministic ensemble sums and future_potentials order

    details = _details(engine, kb, [t[1] for t in scored])
    preds = []
    for pre, name, events, flat, sim, blocks, past_len, present_len, extras in scored:
        freq, emos = details.get(name, (1, []))
        matches = [sym for _i, j, n in blocks for sym in state[j:j + n]]
        p = _prediction(name, events, freq, _average_emotives(emos), matches, past_len, present_len, extras, sim,
                        len(blocks), stm, len(flat))
        if pruned:
            p["_pre_potential"] = pre     # KATO leaves this helper key in the predictions when it prunes
        preds.append(p)

    unique_patterns, total_pattern_freqs, total_symbols = _kb_stats(engine, kb)
    wanted: set[str] = set()
    for p in preds:
        wanted.update(p["matches"])
        wanted.update(chain.from_iterable(p["missing"]))
    pmf = _pmf(engine, kb, wanted)
    probs = {s: (float(pmf[s] / unique_patterns) if unique_patterns > 0 else 0.0) if s in pmf else 0
             for s in wanted}
    ensemble_freq = sum(p["frequency"] for p in preds)
    state_counts = Counter(state)

    for p in preds:
        present = list(chain.from_iterable(p["present"]))
        all_symbols = set(present) | set(state)
        pc = Counter(present)
        sv = [probs.get(s, 0) * state_counts.get(s, 0) for s in all_symbols]
        pv = [probs.get(s, 0) * pc.get(s, 0) for s in all_symbols]
        if all(v == 0 for v in sv) or all(v == 0 for v in pv):
            distance = 1.0
        else:
            dot = sum(a * b for a, b in zip(sv, pv))
            distance = 1.0 - dot / (sqrt(sum(a * a for a in sv)) * sqrt(sum(b * b for b in pv)))
        p_e_h = float(p["frequency"] / total_pattern_freqs) if total_pattern_freqs > 0 else 0.0
        itfdf = 1 - (distance * p["frequency"] / ensemble_freq) if ensemble_freq > 0 else 0.0
        confluence = p_e_h * (1 - _conditional_probability(present, probs)) if present else 0.0
        if present:
            n = len(present)
            entropy = 0.0
            for cnt in pc.values():
                q = cnt / n
                entropy -= q * log2(q)
        else:
            entropy = 0.0
        tfidf = 0.0
        if present and unique_patterns > 0:
            scores = []
            for sym, cnt in pc.items():
                tf = cnt / len(present)
                if sym in probs:
                    pws = int(probs[sym] * unique_patterns) or 1
                else:
                    pws = 1
                scores.append(tf * (log2(unique_patterns / pws) + 1))
            tfidf = sum(scores) / len(scores)
        p.update({"entropy": entropy, "normalized_entropy": _normalized_entropy(present, total_symbols),
                  "global_normalized_entropy": _global_normalized_entropy(present, probs, total_symbols),
                  "itfdf_similarity": itfdf, "confluence": confluence, "tfidf_score": tfidf})

    futures = _ensemble(preds)

    sims_priors = [(p["similarity"], p["frequency"] / ensemble_freq) for p in preds] if ensemble_freq > 0 else []
    evidence_sum = sum(s * pr for s, pr in sims_priors)
    for p in preds:
        if ensemble_freq > 0:
            prior = p["frequency"] / ensemble_freq
            p["bayesian_posterior"] = (p["similarity"] * prior) / evidence_sum if evidence_sum > 0 else 0.0
            p["bayesian_prior"] = prior
        else:
            p["bayesian_posterior"] = 0.0
            p["bayesian_prior"] = 0.0
        p["bayesian_likelihood"] = p["similarity"]
        p["potential"] = ((p["evidence"] + p["confidence"]) * p["snr"] + p["itfdf_similarity"]
                          + _frag_term(p["fragmentation"]))

    ranked = heapq.nsmallest(max_predictions, preds, key=lambda p: (-p["potential"], p["name"]))
    return ranked, futures


def _ensemble(preds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """predictive_information.calculate_ensemble_predictive_information."""
    total = sum(p["frequency"] for p in preds)
    if total == 0:
        for p in preds:
            p["predictive_information"] = 0.0
        return []
    for p in preds:
        p["pattern_probability"] = p["frequency"] / total
        p["weighted_strength"] = p["similarity"] * p["pattern_probability"]
    aggs: dict[str, dict[str, Any]] = {}
    for p in preds:
        if not p["future"]:
            continue
        key = _hash_future(p["future"])
        a = aggs.setdefault(key, {"future": p["future"], "total_weighted_frequency": 0.0, "pattern_count": 0})
        a["total_weighted_frequency"] += p["frequency"] * p["similarity"]
        a["pattern_count"] += 1
    tw = sum(a["total_weighted_frequency"] for a in aggs.values())
    for a in aggs.values():
        a["aggregate_potential"] = a["total_weighted_frequency"] / tw if tw > 0 else 0.0
    for p in preds:
        if not p["future"]:
            p["predictive_information"] = 0.0
            continue
        fp = aggs[_hash_future(p["future"])]["aggregate_potential"]
        p["predictive_information"] = p["weighted_strength"] / fp if fp > 0 else 0.0
    return [{"future": a["future"], "aggregate_potential": a["aggregate_potential"],
             "supporting_patterns": a["pattern_count"], "total_weighted_frequency": a["total_weighted_frequency"]}
            for a in sorted(aggs.values(), key=lambda x: x["aggregate_potential"], reverse=True)]


def _single_symbol(engine: "Engine", kb: str, symbol: str, max_predictions: int) -> list[dict[str, Any]]:
    """KATO's one-symbol fast path: patterns whose first symbol is `symbol`, flat fields, threshold 0.

    KATO builds its query by string interpolation and crashes on an apostrophe (§7.1); here the symbol is
    only a dictionary key."""
    idx = engine.kb_index.get(engine, kb)
    hits = [i for i in idx.by_symbol.get(symbol, ()) if idx.flats[i][0] == symbol]
    pats = {idx.names[i]: (idx.events[i], idx.flats[i]) for i in hits}
    first = sorted(pats)
    details = _details(engine, kb, first)
    preds = []
    for name in first:
        events, flat = pats[name]
        freq, emos = details.get(name, (1, []))
        n = len(flat)
        evidence = 1.0 / n
        confidence = 1.0
        snr = 1.0
        preds.append({
            "name": name, "pattern_data": events, "length": n, "frequency": freq,
            "emotives": _average_emotives(emos), "matches": [symbol], "missing": [], "present": [symbol],
            "past": [], "future": flat[1:], "extras": [], "similarity": 2.0 / (n + 1), "evidence": evidence,
            "confidence": confidence, "snr": snr, "fragmentation": 0.0, "anomalies": [],
            "weighted_similarity": None, "weighted_evidence": None, "weighted_confidence": None,
            "weighted_snr": None, "potential": (evidence + confidence) * snr + 1.0,
        })
    return heapq.nsmallest(max_predictions, preds, key=lambda p: (-p["potential"], p["name"]))
