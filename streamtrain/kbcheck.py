"""The knowledge base's identity: is the server's KB the one a checkpoint describes?

A checkpoint records what the KB must hold at least; a resume checks it before training, so a deleted or swapped
``kb.sqlite3``, a ``server_url`` pointing at another server, or a cleared node is refused instead of training the
rest of the stream onto a KB that lacks its beginning.

* Any server (a real KATO too): a few *probes*, pattern names this run learned, with the frequency each had when
  recorded (``GET /pattern/{name}?node_id=``). Per level the oldest probe is kept for the run's life and the newest
  is refreshed at each checkpoint.
* The embedded server also: the id stored inside its database file, and each node's pattern count and total
  frequency (``GET /nodes``).

Every comparison is "at least", never "equal": samples in flight at the checkpoint and other clients learning on
the same nodes only add, so they never cause a false refusal.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from .client import KatoClient
from .errors import KnowledgeBaseMismatch

logger = logging.getLogger(__name__)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeTotals(_Record):
    node_id: str
    patterns: int = Field(ge=0)
    total_frequency: int = Field(ge=0)


class Probe(_Record):
    level: int = Field(ge=0)
    node_id: str
    name: str
    frequency: int = Field(ge=1)


class KnowledgeBaseRecord(_Record):
    """What the run's KB held at least when a checkpoint was written."""

    database_id: str | None = Field(None, description="The embedded server's id of its database file.")
    nodes: list[NodeTotals] = Field(default_factory=list, description="Embedded server: totals per node.")
    probes: list[Probe] = Field(default_factory=list, description="Patterns this run learned (any server).")


def record_knowledge_base(client: KatoClient, node_ids: Sequence[str], candidates: Mapping[int, str],
                          previous: KnowledgeBaseRecord | None) -> KnowledgeBaseRecord:
    """Read what the KB holds now: the totals (where offered) and the probes (the previous record's oldest per
    level, plus ``candidates``: level -> a pattern name learned since)."""
    info = client.info()
    nodes: list[NodeTotals] = []
    if "nodes" in info.extensions:
        wanted = set(node_ids)
        nodes = [NodeTotals(node_id=n.node_id, patterns=n.pattern_count, total_frequency=n.total_frequency)
                 for n in client.nodes() if n.node_id in wanted]
    kept: dict[int, list[Probe]] = {}
    for p in (previous.probes if previous else []):
        kept.setdefault(p.level, []).append(p)
    probes: list[Probe] = []
    for level, node_id in enumerate(node_ids):
        old = kept.get(level, [])
        oldest, newest = (old[0] if old else None), (old[-1] if len(old) > 1 else None)
        name = candidates.get(level)
        if name is not None and (oldest is None or name != oldest.name):
            found = client.pattern(node_id, name)
            if found is not None and found.frequency >= 1:
                newest = Probe(level=level, node_id=node_id, name=name, frequency=found.frequency)
        if oldest is None:
            oldest, newest = newest, None
        probes.extend(p for p in (oldest, newest) if p is not None)
    return KnowledgeBaseRecord(database_id=info.database_id, nodes=nodes, probes=probes)


def knowledge_base_problems(client: KatoClient, record: KnowledgeBaseRecord) -> list[str]:
    """How the server's KB falls short of ``record``; empty when it holds at least what was recorded."""
    problems: list[str] = []
    info = client.info()
    if record.database_id is not None and info.database_id != record.database_id:
        found = info.database_id or "none (not the embedded server)"
        problems.append(f"database id: expected {record.database_id}, found {found} (another or a new database)")
    if record.nodes:
        have = {n.node_id: n for n in client.nodes()} if "nodes" in info.extensions else {}
        for want in record.nodes:
            got = have.get(want.node_id)
            patterns, freq = (got.pattern_count, got.total_frequency) if got else (0, 0)
            if patterns < want.patterns or freq < want.total_frequency:
                problems.append(f"node {want.node_id}: expected at least {want.patterns} patterns (total frequency "
                                f"{want.total_frequency}), found {patterns} (total frequency {freq})")
    for probe in record.probes:
        stored = client.pattern(probe.node_id, probe.name)
        if stored is None:
            problems.append(f"node {probe.node_id}: pattern {probe.name} is missing (learned by this run)")
        elif stored.frequency < probe.frequency:
            problems.append(f"node {probe.node_id}: pattern {probe.name} has frequency {stored.frequency}, "
                            f"expected at least {probe.frequency}")
    return problems


def check_knowledge_base(client: KatoClient, record: KnowledgeBaseRecord | None, checkpoint: str,
                         where: str, embedded: bool) -> None:
    """Raise KnowledgeBaseMismatch naming each shortfall and the ways out."""
    if record is None:
        return
    problems = knowledge_base_problems(client, record)
    if not problems:
        return
    if embedded:
        restore = (f"restore {where} (with its -wal file if it has one) from a copy made after that checkpoint; "
                   "or, if the run moved, use the run folder that holds its kb.sqlite3")
    else:
        restore = (f"point server_url at the server that holds this run's knowledge base (now {where}), "
                   "or restore that server's data")
    raise KnowledgeBaseMismatch(
        f"the knowledge base at {where} is not the one {checkpoint} describes:\n  " + "\n  ".join(problems)
        + f"\nTraining on would leave a knowledge base without the samples trained so far. Ways out: {restore}; "
        "or start the run over (streamtrain train --fresh --move-aside; train(config, fresh=True, move_aside=True))."
    )
