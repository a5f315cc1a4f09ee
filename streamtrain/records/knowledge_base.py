"""The knowledge base's record in a checkpoint: what the run's KB held at least when the checkpoint was written.

Reading the server into one of these and comparing two of them is ``kbcheck.py``'s (which says why a resume and a
running call check the KB); this module is the format only, so a checkpoint loads without an HTTP client.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
