"""The knowledge base's identity: is the server's KB the one a checkpoint describes, and did it stay so?

A checkpoint records what the KB must hold at least; a resume checks it before training, so a deleted or swapped
``kb.sqlite3``, a ``server_url`` pointing at another server, or a cleared node is refused instead of training the
rest of the stream onto a KB that lacks its beginning. A running call compares the KB with the last good record at
every checkpoint and whenever a worker's session is lost, before the record is replaced (the trainer rolls the run
back when it changed: docs/trainer.md, "The knowledge base changes during a call").

* Any server (a real KATO too): a few *probes*, pattern names this run learned, with the frequency each had when
  recorded (``GET /pattern/{name}?node_id=``). Per level the oldest probe is kept for the run's life and the newest
  is refreshed at each checkpoint. At a checkpoint the patterns learned since the last one (per worker and level,
  the first that worker's samples learned) must be there too: a node cleared, or a server swapped, after one of
  them was learned misses it.
* The embedded server also: the id stored inside its database file, and each node's pattern count and total
  frequency (``GET /nodes``).

Every comparison is "at least", never "equal": samples in flight at the checkpoint and other clients learning on
the same nodes only add, so they never cause a false refusal. Reading (``read_knowledge_base``) and comparing
(``knowledge_base_problems``, records in, problems out) are apart, so one reading serves both the comparison and the
next record (``next_record``). The record itself, as a checkpoint holds it, is ``records/knowledge_base.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from .errors import KnowledgeBaseMismatch
from .records.knowledge_base import KnowledgeBaseRecord, NodeTotals, Probe

if TYPE_CHECKING:  # for the annotations only: the caller brings the client
    from .client import KatoClient

logger = logging.getLogger(__name__)


class Learned(NamedTuple):
    """A pattern that a sample finished since the last record learned: it must be in the knowledge base."""

    level: int
    node_id: str
    name: str


def read_knowledge_base(client: KatoClient, node_ids: Sequence[str], previous: KnowledgeBaseRecord | None,
                        learned: Sequence[Learned] = ()) -> KnowledgeBaseRecord:
    """What the KB holds now, as a record to compare with ``previous`` (``knowledge_base_problems``): the database
    id and the totals of ``node_ids`` (where offered), and ``previous``'s probes and the ``learned`` patterns with
    their frequency now, the previous ones first; a pattern the KB lacks is left out. One ``GET /``, one
    ``GET /nodes`` and a ``GET /pattern`` per probe."""
    info = client.info()
    nodes: list[NodeTotals] = []
    if "nodes" in info.extensions:
        wanted = set(node_ids)
        nodes = [NodeTotals(node_id=n.node_id, patterns=n.pattern_count, total_frequency=n.total_frequency)
                 for n in client.nodes() if n.node_id in wanted]
    probes: list[Probe] = []
    seen: set[tuple[str, str]] = set()
    wanted_probes = [(p.level, p.node_id, p.name) for p in (previous.probes if previous else [])] + list(learned)
    for level, node_id, name in wanted_probes:
        if (node_id, name) in seen:
            continue
        seen.add((node_id, name))
        found = client.pattern(node_id, name)
        if found is not None and found.frequency >= 1:
            probes.append(Probe(level=level, node_id=node_id, name=name, frequency=found.frequency))
    return KnowledgeBaseRecord(database_id=info.database_id, nodes=nodes, probes=probes)


def knowledge_base_problems(expected: KnowledgeBaseRecord | None, found: KnowledgeBaseRecord,
                            learned: Sequence[Learned] = ()) -> list[str]:
    """How ``found`` (``read_knowledge_base``) falls short of ``expected``, and which ``learned`` patterns it lacks:
    one line per shortfall, naming the database id or the node, what was expected and what was found; empty when
    the KB holds at least what was recorded."""
    problems: list[str] = []
    if expected is not None and expected.database_id is not None and found.database_id != expected.database_id:
        what = found.database_id or "none (not the embedded server)"
        problems.append(f"database id: expected {expected.database_id}, found {what} (another or a new database)")
    have = {n.node_id: n for n in found.nodes}
    for want in expected.nodes if expected is not None else []:
        got = have.get(want.node_id)
        patterns, freq = (got.patterns, got.total_frequency) if got else (0, 0)
        if patterns < want.patterns or freq < want.total_frequency:
            problems.append(f"node {want.node_id}: expected at least {want.patterns} patterns (total frequency "
                            f"{want.total_frequency}), found {patterns} (total frequency {freq})")
    stored = {(p.node_id, p.name): p.frequency for p in found.probes}
    for probe in expected.probes if expected is not None else []:
        frequency = stored.get((probe.node_id, probe.name))
        if frequency is None:
            problems.append(f"node {probe.node_id}: pattern {probe.name} is missing (learned by this run)")
        elif frequency < probe.frequency:
            problems.append(f"node {probe.node_id}: pattern {probe.name} has frequency {frequency}, "
                            f"expected at least {probe.frequency}")
    recorded = {(p.node_id, p.name) for p in expected.probes} if expected is not None else set()
    for level, node_id, name in learned:
        if (node_id, name) not in stored and (node_id, name) not in recorded:
            problems.append(f"node {node_id}: expected pattern {name} (level {level}, learned by this run since the "
                            "last check), found none")
            recorded.add((node_id, name))
    return problems


def next_record(found: KnowledgeBaseRecord) -> KnowledgeBaseRecord:
    """The record to keep from a reading that passed the comparison: the totals, and per level two probes, the
    oldest (kept for the run's life) and the newest (a pattern learned since the last record, when there is one)."""
    by_level: dict[int, list[Probe]] = {}
    for p in found.probes:
        by_level.setdefault(p.level, []).append(p)
    kept: list[Probe] = []
    for level in sorted(by_level):
        oldest, newest = by_level[level][0], by_level[level][-1]
        kept += [oldest] if newest is oldest else [oldest, newest]
    return found.model_copy(update={"probes": kept})


def check_knowledge_base(client: KatoClient, record: KnowledgeBaseRecord | None, node_ids: Sequence[str],
                         checkpoint: str, where: str, embedded: bool) -> KnowledgeBaseRecord:
    """On resume: raise KnowledgeBaseMismatch naming each shortfall and the ways out; else return what the KB holds
    now (``read_knowledge_base``), the start of the call's record."""
    found = read_knowledge_base(client, node_ids, record)
    problems = knowledge_base_problems(record, found)
    if not problems:
        return found
    if embedded:
        restore = (f"restore {where} (with its -wal file if it has one) from a copy made after that checkpoint; "
                   "or, if the run moved, use the run folder that holds its kb.sqlite3")
    else:
        restore = (f"point server_url at the server that holds this run's knowledge base (now {where}), "
                   "or restore that server's data")
    raise KnowledgeBaseMismatch(
        f"the knowledge base at {where} is not the one {checkpoint} describes:\n  " + "\n  ".join(problems)
        + f"\nTraining on would leave a knowledge base without the samples trained so far. Ways out: {restore}; "
        "or start the run over (streamtrain train --fresh --move-aside; train(config, fresh=True, move_aside=True)).",
        problems=problems,
    )
