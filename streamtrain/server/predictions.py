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
from typing import Any, NamedTuple

import numpy as np
from rapidfuzz import fuzz, process
from rapidfuzz.distance import LCSseq

from streamtrain.server.kbindex import KBIndex
from streamtrain.server.session import average_emotives
from streamtrain.server.store import Store

logger = logging.getLogger(__name__)


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


class Aligned(NamedTuple):
    """A candidate aligned with the state: what ranking needs before its stored details are read."""

    pre: float                          # the pruning key, (evidence + confidence) * snr + fragmentation term
    name: str
    events: list[list[str]]
    flat: list[str]
    similarity: float
    blocks: list[tuple[int, int, int]]  # (pattern position, state position, size), as difflib gives them
    extras: int                         # state symbols the flat present does not match (the snr's e)
    e1: int                             # events[:e1] the past, events[e1:ev] the present, events[ev:] the future
    ev: int


def resegment(events: list[list[str]], past_len: int, present_len: int, first_match: str | None) -> tuple[int, int]:
    """representations/prediction.py: the flat alignment's past and present (past_len, present_len symbols) cut
    back into the pattern's events, as (e1, ev): events[:e1] the past, events[e1:ev] the present, events[ev:] the
    future. The present starts one event earlier when the last past event holds the first matched symbol."""
    c2 = ev = 0
    while c2 < past_len:
        c2 += len(events[ev])
        ev += 1
    e1 = ev
    while c2 < past_len + present_len:
        c2 += len(events[ev])
        ev += 1
    if e1 > 0 and first_match is not None and first_match in events[e1 - 1]:
        e1 -= 1
    return e1, ev


def _prediction(a: Aligned, state: list[str], stm_events: list[list[str]], frequency: int,
                emotives: dict[str, float]) -> dict[str, Any]:
    """One prediction's fields: event-aligned past/present/future, missing and extras, the alignment metrics."""
    matches = [sym for _i, j, n in a.blocks for sym in state[j:j + n]]
    m = len(matches)
    denom = 2.0 * m + a.extras
    snr = float((2.0 * m - a.extras) / denom) if denom > 0 else 0.0
    events = a.events
    past, present, future = events[:a.e1], events[a.e1:a.ev], events[a.ev:]
    match_set = set(matches)
    missing = [[s for s in e if s not in match_set] for e in present]
    present_set = set(chain.from_iterable(present))
    extras = [[s for s in e if s not in present_set] for e in stm_events]
    present_len = sum(len(e) for e in present)
    length = len(a.flat)
    return {
        "type": "prototypical", "name": a.name, "frequency": frequency, "emotives": emotives,
        "matches": matches, "past": past, "present": present, "missing": missing, "extras": extras,
        "anomalies": [], "potential": 0.0,
        "evidence": float(m / length) if length > 0 else 0.0,
        "similarity": a.similarity, "fragmentation": float(len(a.blocks) - 1), "snr": snr,
        "confluence": 0.0, "predictive_information": 0.0, "sequence": events, "future": future,
        "confidence": float(m / present_len) if present_len > 0 else 0.0,
        "weighted_similarity": None, "weighted_evidence": None, "weighted_confidence": None, "weighted_snr": None,
    }


def _frag_term(frag: float) -> float:
    # KATO 3.10.1 divides by zero here (fragmentation -1: no matching block, only at threshold 0).
    return 0.0 if frag == -1 else 1.0 / (frag + 1)


# ---------------------------------------------------------------------------------------- entry point
def predict(store: Store, idx: KBIndex, kb: str, stm: list[list[str]], *, recall_threshold: float,
            max_predictions: int, use_token_matching: bool, use_index: bool = True, early_stop: bool = True
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(predictions, future_potentials) for this STM against knowledge base `kb` (`idx`: its patterns in memory;
    `store`: its frequencies, emotives and symbol statistics).

    use_index=False scores every pattern of the node and early_stop=False aligns every qualifying
    candidate: same answer, slower (the benchmark and the tests compare them)."""
    state = list(chain.from_iterable(stm))
    if not state:
        return [], []
    if len(state) == 1:
        return _single_symbol(store, idx, kb, state[0], max_predictions), []
    cand = _candidates(idx, state, recall_threshold, use_index)
    if not len(cand):
        return [], []
    limit = max_predictions * 3
    aligned, pruned = _align(idx, state, cand, recall_threshold, use_token_matching, limit, early_stop)
    if not aligned:
        return [], []
    if pruned:
        aligned = heapq.nsmallest(limit, aligned, key=lambda t: (-t.pre, t.name))
    else:
        aligned.sort(key=lambda t: t.name)     # deterministic ensemble sums and future_potentials order
    details = store.frequencies_and_emotives(kb, [a.name for a in aligned])
    preds = []
    for a in aligned:
        freq, emos = details.get(a.name, (1, []))
        p = _prediction(a, state, stm, freq, average_emotives(emos))
        if pruned:
            p["_pre_potential"] = a.pre     # KATO leaves this helper key in the predictions when it prunes
        preds.append(p)
    _information_metrics(store, kb, preds, state)
    futures = _ensemble(preds)
    _bayesian_and_potential(preds)
    ranked = heapq.nsmallest(max_predictions, preds, key=lambda p: (-p["potential"], p["name"]))
    return ranked, futures


# ---------------------------------------------------------------------------------------- the phases of predict
def _candidates(idx: KBIndex, state: list[str], threshold: float, use_index: bool) -> np.ndarray:
    """Positions of the patterns that can qualify: those sharing a symbol with the state (a pattern sharing none
    has similarity 0), or every pattern at threshold 0 or without the index."""
    if use_index and threshold > 0:
        chosen: set[int] = set()
        for sym in set(state):
            chosen.update(idx.by_symbol.get(sym, ()))
        return np.fromiter(chosen, dtype=np.int64, count=len(chosen))
    return np.arange(len(idx.names), dtype=np.int64)


def _similarities(idx: KBIndex, state: list[str], cand: np.ndarray, use_token_matching: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(an upper bound of each candidate's matched symbols, its similarity x 100), as KATO scores them."""
    flats = idx.flats
    if use_token_matching:
        # Same float operations as KATO's per-pattern 2.0*LCS/(len_p+len_s)*100.0, vectorized.
        lcs = process.cdist([state], [flats[i] for i in cand], scorer=LCSseq.similarity, dtype=np.int64,
                            workers=1)[0].astype(np.float64)
        return lcs, 2.0 * lcs / (idx.lens()[cand] + len(state)) * 100.0
    lcs = idx.lens()[cand]            # no cheap bound in character mode
    joined = " ".join(state)
    return lcs, np.array([fuzz.ratio(" ".join(flats[i]), joined) for i in cand], dtype=np.float64)


def _align(idx: KBIndex, state: list[str], cand: np.ndarray, threshold: float, use_token_matching: bool, limit: int,
           early_stop: bool) -> tuple[list[Aligned], bool]:
    """Align each qualifying candidate with the state; (the aligned, whether KATO prunes them to `limit`).

    When more than `limit` qualify, the most promising are aligned first and the loop stops once no candidate left
    can enter the `limit` best pruning keys (early_stop)."""
    lcs, score = _similarities(idx, state, cand, use_token_matching)
    keep = score >= threshold * 100.0 - 1e-6
    q_idx, q_lcs, q_score = cand[keep], lcs[keep], score[keep]
    will_prune = len(q_idx) > limit
    ls = len(state)
    # Upper bound of each candidate's pruning key (evidence + confidence) * snr + 1/(fragmentation + 1)
    # from its LCS L: matched symbols m <= L and snr = (3m - ls)/(m + ls) rises with m; evidence <= L/len,
    # confidence <= 1, and when even the best snr is negative, evidence + confidence >= 2/len (m >= 1);
    # the fragmentation term is at most 1.
    q_len = idx.lens()[q_idx]
    snr_max = (3.0 * q_lcs - ls) / (q_lcs + ls)
    bound = np.where(snr_max >= 0, (q_lcs / q_len + 1.0) * snr_max, 2.0 / q_len * snr_max) + 1.0
    order = np.argsort(-bound, kind="stable") if will_prune else np.arange(len(q_idx))
    b2j: dict[str, list[int]] = {}
    for j, sym in enumerate(state):
        b2j.setdefault(sym, []).append(j)
    heap: list[float] = []
    aligned: list[Aligned] = []
    for k in order.tolist():
        if early_stop and will_prune and len(heap) >= limit and bound[k] + 1e-9 < heap[0]:
            break
        a = _align_one(idx, int(q_idx[k]), state, b2j, float(q_score[k]) / 100.0,
                       int(q_lcs[k]) if use_token_matching else None, threshold)
        if a is None:
            continue
        aligned.append(a)
        if will_prune:
            if len(heap) < limit:
                heapq.heappush(heap, a.pre)
            elif a.pre > heap[0]:
                heapq.heapreplace(heap, a.pre)
    return aligned, will_prune


def _align_one(idx: KBIndex, i: int, state: list[str], b2j: dict[str, list[int]], similarity: float,
               lcs: int | None, threshold: float) -> Aligned | None:
    """Pattern `i` aligned with the state, or None when nothing matches and the threshold is above 0."""
    name, events, flat = idx.names[i], idx.events[i], idx.flats[i]
    ls = len(state)
    blocks = alignment_blocks(flat, b2j, ls, lcs)
    if blocks:
        i0 = blocks[0][0]
        end = blocks[-1][0] + blocks[-1][2]
        past_len, present_len = i0, (end - i0 if end > i0 else len(flat) - i0)
    elif threshold > 0.0:
        return None
    else:
        past_len, present_len = 0, len(flat)
    m = sum(b[2] for b in blocks)
    # Aligning the flat present with the state again (KATO's compare()) matches the same m symbols:
    # every other state symbol is an extra.
    extras = ls - m
    denom = 2.0 * m + extras
    snr = float((2.0 * m - extras) / denom) if denom > 0 else 0.0
    e1, ev = resegment(events, past_len, present_len, state[blocks[0][1]] if blocks else None)
    present_sym = sum(len(events[k]) for k in range(e1, ev))
    evidence = float(m / len(flat)) if flat else 0.0
    confidence = float(m / present_sym) if present_sym > 0 else 0.0
    pre = (evidence + confidence) * snr + _frag_term(float(len(blocks) - 1))
    return Aligned(pre, name, events, flat, similarity, blocks, extras, e1, ev)


def _information_metrics(store: Store, kb: str, preds: list[dict[str, Any]], state: list[str]) -> None:
    """Entropies, itfdf similarity, confluence and tf-idf of each prediction's present (KATO's formulas)."""
    unique_patterns, total_pattern_freqs, total_symbols = store.kb_stats(kb)
    wanted: set[str] = set()
    for p in preds:
        wanted.update(p["matches"])
        wanted.update(chain.from_iterable(p["missing"]))
    pmf = store.pmf(kb, wanted)
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
            dot = sum(a * b for a, b in zip(sv, pv, strict=True))
            distance = 1.0 - dot / (sqrt(sum(a * a for a in sv)) * sqrt(sum(b * b for b in pv)))
        p_e_h = float(p["frequency"] / total_pattern_freqs) if total_pattern_freqs > 0 else 0.0
        itfdf = 1 - (distance * p["frequency"] / ensemble_freq) if ensemble_freq > 0 else 0.0
        confluence = p_e_h * (1 - _conditional_probability(present, probs)) if present else 0.0
        entropy = 0.0
        for cnt in pc.values():
            q = cnt / len(present)
            entropy -= q * log2(q)
        tfidf = 0.0
        if present and unique_patterns > 0:
            scores = []
            for sym, cnt in pc.items():
                tf = cnt / len(present)
                pws = (int(probs[sym] * unique_patterns) or 1) if sym in probs else 1
                scores.append(tf * (log2(unique_patterns / pws) + 1))
            tfidf = sum(scores) / len(scores)
        p.update({"entropy": entropy, "normalized_entropy": _normalized_entropy(present, total_symbols),
                  "global_normalized_entropy": _global_normalized_entropy(present, probs, total_symbols),
                  "itfdf_similarity": itfdf, "confluence": confluence, "tfidf_score": tfidf})


def _bayesian_and_potential(preds: list[dict[str, Any]]) -> None:
    """Bayesian prior, likelihood and posterior over the ensemble, and each prediction's potential."""
    ensemble_freq = sum(p["frequency"] for p in preds)
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


def _single_symbol(store: Store, idx: KBIndex, kb: str, symbol: str, max_predictions: int) -> list[dict[str, Any]]:
    """KATO's one-symbol fast path: patterns whose first symbol is `symbol`, flat fields, threshold 0.

    KATO builds its query by string interpolation and crashes on an apostrophe (§7.1); here the symbol is
    only a dictionary key."""
    hits = [i for i in idx.by_symbol.get(symbol, ()) if idx.flats[i][0] == symbol]
    pats = {idx.names[i]: (idx.events[i], idx.flats[i]) for i in hits}
    first = sorted(pats)
    details = store.frequencies_and_emotives(kb, first)
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
            "emotives": average_emotives(emos), "matches": [symbol], "missing": [], "present": [symbol],
            "past": [], "future": flat[1:], "extras": [], "similarity": 2.0 / (n + 1), "evidence": evidence,
            "confidence": confidence, "snr": snr, "fragmentation": 0.0, "anomalies": [],
            "weighted_similarity": None, "weighted_evidence": None, "weighted_confidence": None,
            "weighted_snr": None, "potential": (evidence + confidence) * snr + 1.0,
        })
    return heapq.nsmallest(max_predictions, preds, key=lambda p: (-p["potential"], p["name"]))
