"""What a run learned and where it stands, as plain data: the engine behind the notebooks.

Nothing here prints or plots (``streamtrain.notebook`` does that); every function returns lists of dicts or
plain values, one dict per table row, so a caller can print them, assert on them or hand them to pandas.

The hierarchy, as this module reads it (``hierarchy.py`` writes it): a level-0 pattern is a chunk of tokens,
one token per event; a level-k pattern's symbols are the names (``PTRN|<sha1>``) of level k-1 patterns. So
any pattern decodes back to its tokens by looking its symbols up one level down, down to level 0.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .client import KatoClient
from .config import RunConfig, leaves, resume_differences, resume_policy
from .errors import ProtocolError
from .patterns import PREFIX, strip_prefix
from .records.checkpoint import Checkpoint, CheckpointStore
from .serverconn import Connection, connect

log = logging.getLogger(__name__)

__all__ = [
    "Connection",
    "Decoder",
    "checkpoint_table",
    "config_diff",
    "config_table",
    "connect",
    "decode_pattern",
    "frequency_distribution",
    "kb_by_level",
    "kb_differences",
    "kb_summary",
    "pattern_frequencies",
    "predict",
    "prompt_tokens",
    "tokens_to_text",
    "top_patterns",
]


# --------------------------------------------------------------------------------------------------
# Tokens <-> text


def prompt_tokens(config: RunConfig, text: str) -> list[str]:
    """``text`` cut into tokens by the run's tokenizer (the same cut as training)."""
    from .data.tokenization import get_tokenizer

    return list(get_tokenizer(config.tokenizer)(text))


_NO_SPACE_BEFORE = re.compile(r"^[.,;:!?)\]}'’”%]|^n't$|^'[a-z]{1,2}$", re.IGNORECASE)
_NO_SPACE_AFTER = {"(", "[", "{", "“", "‘", "$"}


def tokens_to_text(tokens: Sequence[str], tokenizer: Any = "words") -> str:
    """Readable text from tokens: ``gpt2`` tokens carry their own spaces; a Hugging Face tokenizer
    (``{hf = ...}``) decodes its own tokens; ``words`` tokens are joined with spaces except before closing
    punctuation (display only: the exact spacing of the source is not stored)."""
    if tokenizer == "gpt2":
        return "".join(tokens)
    spec = tokenizer.get("hf") if isinstance(tokenizer, dict) else getattr(tokenizer, "hf", None)
    if isinstance(spec, str):
        from .data.tokenization import hf_decode, load_hf

        return hf_decode(load_hf(spec), list(tokens))
    out: list[str] = []
    for tok in tokens:
        if out and not _NO_SPACE_BEFORE.match(tok) and out[-1] not in _NO_SPACE_AFTER:
            out.append(" ")
        out.append(tok)
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# Decoding patterns through the hierarchy


@dataclass
class Decoder:
    """Decodes pattern names of any level back to tokens, caching every pattern it looks up.

    ``tokens(level, name)``: a level-0 pattern's symbols are tokens; a level-k pattern's symbols are names of
    level k-1 patterns, each decoded in turn. One ``GET /pattern`` per distinct pattern, ever.
    """

    client: KatoClient
    config: RunConfig
    _events: dict[tuple[int, str], list[list[str]]] = field(default_factory=dict, repr=False)
    _tokens: dict[tuple[int, str], list[str]] = field(default_factory=dict, repr=False)
    lookups: int = 0

    def remember(self, level: int, name: str, pattern_data: list[list[str]]) -> None:
        """Seed the cache with a pattern already fetched (e.g. from a node listing)."""
        self._events[(level, strip_prefix(name))] = pattern_data

    def events(self, level: int, name: str) -> list[list[str]]:
        """The stored events of pattern ``name`` on ``level``'s node."""
        key = (level, strip_prefix(name))
        if key not in self._events:
            if not 0 <= level < len(self.config.layers):
                raise ValueError(f"level {level} is outside the run's hierarchy (levels 0..{len(self.config.layers) - 1})")
            self.lookups += 1
            info = self.client.pattern(self.config.node_id(level), name)
            if info is None:
                raise LookupError(
                    f"pattern {PREFIX}{key[1]} is not on node {self.config.node_id(level)!r} (level {level}) of "
                    f"{self.client.base_url}: wrong level or name, or another run's knowledge base"
                )
            self._events[key] = info.pattern_data
        return self._events[key]

    def symbol_tokens(self, level: int, symbol: str) -> list[str]:
        """The tokens one symbol of a level-``level`` pattern stands for."""
        if level == 0:
            return [symbol]
        return self.tokens(level - 1, symbol)

    def tokens(self, level: int, name: str) -> list[str]:
        """Every token of pattern ``name`` of ``level``, in order."""
        key = (level, strip_prefix(name))
        if key not in self._tokens:
            self._tokens[key] = self.events_tokens(level, self.events(level, name))
        return self._tokens[key]

    def events_tokens(self, level: int, events: Iterable[Any]) -> list[str]:
        """Tokens of a list of events (or a flat list of symbols) of a level-``level`` pattern."""
        out: list[str] = []
        for item in events:
            for symbol in item if isinstance(item, list) else [item]:
                out.extend(self.symbol_tokens(level, symbol))
        return out

    def text(self, level: int, name: str) -> str:
        return tokens_to_text(self.tokens(level, name), self.config.tokenizer)


def decode_pattern(client: KatoClient, config: RunConfig, level: int, name: str,
                   decoder: Decoder | None = None) -> list[str]:
    """The tokens of pattern ``name`` (with or without ``PTRN|``) of ``level``; pass a Decoder to share its cache."""
    return (decoder or Decoder(client, config)).tokens(level, name)


# --------------------------------------------------------------------------------------------------
# Knowledge-base statistics (the embedded server's /nodes extension; a real KATO has no listing of a node)


def _unknown_node(client: KatoClient, exc: ProtocolError) -> bool:
    """A 404 from /nodes/{id} of a server that has the /nodes extension: a node it has never seen (no session, no
    learn), whose knowledge base is empty. Decided by the status and the server's advertised extensions."""
    return exc.status_code == 404 and client.supports_nodes


def _node_patterns(client: KatoClient, node_id: str) -> list[Any]:
    """Every pattern of the node; none for a node the server has never seen."""
    try:
        return list(client.node_patterns(node_id))
    except ProtocolError as exc:
        if _unknown_node(client, exc):
            return []
        raise


@contextmanager
def _nodes_extension(client: KatoClient) -> Iterator[None]:
    try:
        yield
    except ProtocolError as exc:
        if exc.status_code not in (404, 405) or _unknown_node(client, exc):
            raise
        raise ProtocolError(
            f"{exc}\nKnowledge-base listings and statistics use the /nodes extension of streamtrain's embedded "
            f"server, which {client.base_url} does not have (a real KATO lists no node's patterns). Use the "
            "embedded server (`streamtrain serve`, or no server_url) for them; predictions and decoding by name "
            "work on any KATO."
        ) from None


def kb_summary(client: KatoClient, config: RunConfig) -> list[dict[str, Any]]:
    """One row per level: node, patterns (distinct), total frequency (learns), distinct symbols."""
    rows = []
    for level in range(len(config.layers)):
        node = config.node_id(level)
        try:
            with _nodes_extension(client):
                stats = client.node_stats(node)
        except ProtocolError as exc:
            if not _unknown_node(client, exc):
                raise
            rows.append({"level": level, "node": node, "patterns": 0, "total_frequency": 0, "distinct_symbols": 0})
            continue
        rows.append({
            "level": level,
            "node": stats.node_id,
            "patterns": stats.pattern_count,
            "total_frequency": stats.total_frequency,
            "distinct_symbols": stats.distinct_symbols,
        })
    return rows


def kb_by_level(client: KatoClient, config: RunConfig) -> dict[int, dict[str, int]]:
    """The run's whole knowledge base: level -> {pattern name (``PTRN|...``): frequency}."""
    with _nodes_extension(client):
        return {
            level: {PREFIX + strip_prefix(p.name): p.frequency for p in _node_patterns(client, config.node_id(level))}
            for level in range(len(config.layers))
        }


def kb_differences(client: KatoClient, a: RunConfig, b: RunConfig) -> list[dict[str, Any]]:
    """Every pattern whose frequency differs between two runs on one server (absent = 0), level by level.

    Names above level 0 are names of names, independent of the run's name, so two runs that trained the same
    records with the same layers have no difference, whatever their order, calls or workers.
    """
    kb_a, kb_b = kb_by_level(client, a), kb_by_level(client, b)
    rows = []
    for level in sorted(set(kb_a) | set(kb_b)):
        pa, pb = kb_a.get(level, {}), kb_b.get(level, {})
        for name in sorted(set(pa) | set(pb)):
            if pa.get(name, 0) != pb.get(name, 0):
                rows.append({"level": level, "name": name, a.run_name: pa.get(name, 0), b.run_name: pb.get(name, 0)})
    return rows


def pattern_frequencies(client: KatoClient, config: RunConfig, level: int) -> list[int]:
    """The frequency of every pattern of ``level``, largest first."""
    with _nodes_extension(client):
        return sorted((p.frequency for p in _node_patterns(client, config.node_id(level))), reverse=True)


def frequency_distribution(client: KatoClient, config: RunConfig, level: int) -> list[dict[str, int]]:
    """How many patterns of ``level`` were learned exactly f times, per frequency f (ascending)."""
    counts = Counter(pattern_frequencies(client, config, level))
    return [{"level": level, "frequency": f, "patterns": n} for f, n in sorted(counts.items())]


def top_patterns(client: KatoClient, config: RunConfig, level: int, n: int = 10,
                 decoder: Decoder | None = None) -> list[dict[str, Any]]:
    """The ``n`` most frequent patterns of ``level``, decoded to tokens (ties by name, so the order is stable)."""
    decoder = decoder or Decoder(client, config)
    with _nodes_extension(client):
        patterns = sorted(_node_patterns(client, config.node_id(level)), key=lambda p: (-p.frequency, p.name))[:n]
    rows = []
    for rank, p in enumerate(patterns, 1):
        decoder.remember(level, p.name, p.pattern_data)
        tokens = decoder.tokens(level, p.name)
        rows.append({
            "rank": rank,
            "level": level,
            "name": PREFIX + strip_prefix(p.name),
            "frequency": p.frequency,
            "events": len(p.pattern_data),
            "tokens": len(tokens),
            "text": tokens_to_text(tokens, config.tokenizer),
        })
    return rows


# --------------------------------------------------------------------------------------------------
# Predictions


def _symbols_for_level(config: RunConfig, tokens: Sequence[str], level: int) -> list[str]:
    """The symbols ``level`` sees for these tokens: the tokens on level 0, else the names training would give."""
    if level == 0:
        return list(tokens)
    from .hierarchy import plan_sample

    names = [s.name for s in plan_sample(tokens, config.layers) if s.level == level - 1]
    return names


def predict(client: KatoClient, config: RunConfig, prompt: str | Sequence[str], level: int = 0, top: int = 10,
            decoder: Decoder | None = None) -> list[dict[str, Any]]:
    """KATO's predictions for ``prompt`` on ``level``'s node, decoded to text; one row per prediction.

    The prompt (text, or a list of tokens) is cut by the run's tokenizer and observed one symbol per event (as training does) in a fresh
    session with ``process_predictions`` off; then ``GET /predictions`` is read and the session deleted. On a
    level above 0 the observed symbols are the names training would give the prompt's chunks one level down,
    so only chunks seen in training can match there.

    Each row holds ``name`` (``PTRN|...``, the matched pattern: look it up with ``client.pattern``), the
    pattern's whole text, past / present / future as text, the matched and missing tokens, frequency,
    potential, similarity, evidence and confidence, in KATO's ranking order.
    """
    if not 0 <= level < len(config.layers):
        raise ValueError(f"level {level} is outside the run's hierarchy (levels 0..{len(config.layers) - 1})")
    tokens = prompt_tokens(config, prompt) if isinstance(prompt, str) else list(prompt)
    symbols = _symbols_for_level(config, tokens, level)
    if not symbols:
        raise ValueError(
            f"prompt {prompt!r} gives no symbols on level {level} (tokens: {tokens!r}); "
            + ("give a non-empty prompt" if level == 0 else "a longer prompt, or level 0")
        )
    decoder = decoder or Decoder(client, config)
    layer = config.layers[level]
    session_config = {
        "process_predictions": False,  # observe stays cheap; GET /predictions computes them once
        "max_pattern_length": 0,
        "recall_threshold": layer.recall_threshold,
        "max_predictions": min(max(top, 1), 10000),  # KATO's allowed range
    }
    session = client.create_session(config.node_id(level), session_config)
    try:
        client.observe_sequence(session.session_id, [[s] for s in symbols])
        answer = client.predictions(session.session_id)
    finally:
        client.delete_session_quietly(session.session_id)
    rows = []
    for rank, pred in enumerate(answer.predictions[:top], 1):
        name = pred.get("name", "")
        part = {key: tokens_to_text(decoder.events_tokens(level, pred.get(key) or []), config.tokenizer)
                for key in ("past", "present", "future")}
        try:
            whole = decoder.text(level, name)
        except LookupError:
            whole = None  # cannot happen with a consistent server; keep the row rather than lose it
        rows.append({
            "rank": rank,
            "name": PREFIX + strip_prefix(name),
            "pattern": whole,
            **part,
            "matches": tokens_to_text(decoder.events_tokens(level, pred.get("matches") or []), config.tokenizer),
            "missing": tokens_to_text(decoder.events_tokens(level, pred.get("missing") or []), config.tokenizer),
            "frequency": pred.get("frequency"),
            "potential": pred.get("potential"),
            "similarity": pred.get("similarity"),
            "evidence": pred.get("evidence"),
            "confidence": pred.get("confidence"),
        })
    return rows


# --------------------------------------------------------------------------------------------------
# Checkpoints and configs


def checkpoint_table(source: RunConfig | str | Path, keep: int = 3) -> list[dict[str, Any]]:
    """Every checkpoint file of a run (a RunConfig or its run folder), oldest first, valid or not."""
    run_dir = source.run_dir if isinstance(source, RunConfig) else Path(source)
    rows = []
    for e in CheckpointStore(run_dir, keep=keep).entries():
        ck = e.checkpoint
        rows.append({
            "sequence": e.sequence,
            "file": e.path.name,
            "valid": e.valid,
            "reason": e.reason,
            "position": ck.position.raw_offset if ck else None,
            "done_above": len(ck.position.done_above) if ck else None,
            "samples_trained": ck.counters.samples_trained if ck else None,
            "tokens": ck.counters.tokens if ck else None,
            "created_at": ck.created_at if ck else None,
            "error": e.error,
        })
    return rows


def config_table(config: RunConfig) -> list[dict[str, Any]]:
    """Every config value (dotted path) with what a resume allows: ``must_match`` or ``may_change``."""
    data = config.model_dump(mode="json")
    rows = []
    for name, policy in resume_policy().items():
        if name not in data:  # a secret (server_token): left out of every dump, shown masked
            data[name] = "**********" if getattr(config, name) is not None else None
        for key, value in leaves(data[name], name).items():
            rows.append({"field": key, "value": value, "on_resume": policy})
    return rows


def _as_config(item: RunConfig | Checkpoint | str | Path) -> RunConfig:
    if isinstance(item, RunConfig):
        return item
    if isinstance(item, Checkpoint):
        return item.config
    return CheckpointStore.load(item).config


def config_diff(old: RunConfig | Checkpoint | str | Path, new: RunConfig | Checkpoint | str | Path) -> list[dict[str, Any]]:
    """Every differing config value between two configs or checkpoints (a checkpoint file path works too).

    ``policy`` says what a resume makes of it: ``must_match`` rows are exactly what
    :func:`config.resume_differences` reports (a resume is refused), ``may_change`` rows are allowed.
    """
    a, b = _as_config(old), _as_config(new)
    rows = [{"field": path, "policy": "must_match", "old": x, "new": y} for path, x, y in resume_differences(a, b)]
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    for name, policy in resume_policy().items():
        if policy == "must_match" or name not in da:  # not in a dump: a secret (server_token), never shown
            continue
        la, lb = leaves(da[name], name), leaves(db[name], name)
        for key in sorted(set(la) | set(lb)):
            x, y = la.get(key, "<absent>"), lb.get(key, "<absent>")
            if x != y:
                rows.append({"field": key, "policy": "may_change", "old": x, "new": y})
    return rows

