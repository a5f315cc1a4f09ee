"""How one sample becomes learns on a hierarchy of KATO nodes.

Level 0 sees the sample's tokens; every other level sees the pattern names its lower level learned, in order.
Each level cuts its symbols into chunks of ``chunk_size``; a chunk is observed one symbol per event and learned.
With a layer's auto-learn (``max_pattern_length > 0``) a chunk yields the patterns KATO's auto-learn would learn
(CLEAR or ROLLING, kato-api.md §5.3) followed by a learn of what remains in the STM.

The rules that keep the result exact and order-free:

* **Units.** Everything is planned client-side as *units*: a list of events learned as one pattern, from an empty
  STM to an empty STM. A sample is a fixed list of steps ``(level, unit)`` numbered 0..K-1. Names are
  ``sha1(repr(events))`` (``patterns.pattern_name``), so the plan of every level is known from the text alone,
  without the server's answers; a resumed run can skip the steps that already took effect and still feed the
  right symbols upwards. The server's answers are checked against the plan.
* **Short chunks.** A chunk of one symbol could make no pattern (KATO learns nothing from fewer than 2 symbols).
  The last chunk of a level, when it has a single symbol, joins the chunk before it (which then holds
  ``chunk_size + 1``); a level whose whole input is one symbol learns nothing, and the levels above it get nothing.
  No symbol is ever invented to pad a chunk.
* **Independence.** Every unit starts and ends with an empty STM, so samples do not interact: the final knowledge
  base depends neither on their order nor on the number of workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from .config import LayerConfig
from .patterns import PREFIX, list_hash, sort_event

Events = list[list[str]]


def chunk_symbols(symbols: Sequence[str], size: int) -> list[list[str]]:
    """Cut into chunks of ``size``; a trailing single symbol joins the previous chunk."""
    chunks = [list(symbols[i : i + size]) for i in range(0, len(symbols), size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2].extend(chunks.pop())
    if chunks and len(chunks[-1]) < 2:
        chunks.pop()  # the whole level is one symbol: nothing to learn
    return chunks


def learn_units(chunk: Sequence[str], layer: LayerConfig) -> list[Events]:
    """The patterns that observing ``chunk`` (one symbol per event) and then learning would store, in order.

    Mirrors KATO's auto-learn (observation_processor.py:244-310) and the final learn of what is left; units
    with fewer than 2 symbols are left out because KATO stores nothing for them.
    """
    mpl, units, stm = layer.max_pattern_length, [], []
    if mpl <= 0:  # no auto-learn (the default): the whole chunk is one unit, one symbol per event
        return [[[symbol] for symbol in chunk]] if len(chunk) >= 2 else []
    for symbol in chunk:
        stm.append(sort_event([symbol]))
        if len(stm) >= mpl:
            if len(stm) == 1:
                units.append(stm)
                stm = []
            elif layer.stm_mode == "ROLLING":
                window = mpl - 1
                kept = stm[-window:] if window > 0 else list(stm)
                units.append(stm)
                stm = list(kept)
            else:
                units.append(stm)
                stm = []
    if stm:
        units.append(stm)
    return [u for u in units if sum(len(e) for e in u) >= 2]


@dataclass(frozen=True, slots=True)
class Step:
    """One learn of a sample: globally numbered, with its level, events and the name it must produce."""

    index: int
    level: int
    events: Events
    name: str


def plan_sample(tokens: Sequence[str], layers: Sequence[LayerConfig]) -> list[Step]:
    """Every learn a sample makes, level by level, in the order they are sent."""
    steps: list[Step] = []
    symbols: list[str] = list(tokens)
    for level, layer in enumerate(layers):
        names: list[str] = []
        for chunk in chunk_symbols(symbols, layer.chunk_size):
            for events in learn_units(chunk, layer):
                # learn_units gives lists of sorted lists with 2 symbols or more: pattern_name's checks hold
                name = PREFIX + list_hash(events)
                steps.append(Step(len(steps), level, events, name))
                names.append(name)
        symbols = names
        if len(symbols) < 2:
            break
    return steps


def step_key(run_name: str, node_id: str, raw_index: int, step: Step) -> str:
    """Deterministic idempotency key of a step: the same step of the same sample always gets the same key.

    Hashed so it stays short whatever the run name; the content's name is part of it, so a changed plan (which
    a must-match config check prevents anyway) could never reuse an old answer.
    """
    raw = f"{run_name}\x1f{node_id}\x1f{raw_index}\x1f{step.index}\x1f{step.name}"
    return "st1-" + hashlib.sha256(raw.encode("utf-8")).hexdigest()[:40]


def sample_key(run_name: str, raw_index: int, steps: Sequence[Step]) -> str:
    """Deterministic idempotency key of a whole sample's batch (every step, every level, in one request)."""
    raw = "\x1f".join([run_name, str(raw_index)] + [s.name for s in steps])
    return "sb1-" + hashlib.sha256(raw.encode("utf-8")).hexdigest()[:40]


def part_key(run_name: str, raw_index: int, first_step: int, steps: Sequence[Step]) -> str:
    """Key of one part of a sample's batch, when the sample is too big for one request: the part's first step index
    is in it, so two parts with the same content (repetitive text) never share a key."""
    raw = "\x1f".join([run_name, str(raw_index), f"part@{first_step}"] + [s.name for s in steps])
    return "sp1-" + hashlib.sha256(raw.encode("utf-8")).hexdigest()[:40]
