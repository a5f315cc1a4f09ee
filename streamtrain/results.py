"""What a call of ``train`` returns: the run's counts, this call's throughput, and a bounded progress history."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from .records.checkpoint import FailedSample, FilterReasons


class ProgressPoint(BaseModel):
    elapsed_seconds: float
    position: int
    samples_trained: int
    tokens: int


class TrainResult(BaseModel):
    """What a call of :func:`train` did, and where the run stands."""

    run_name: str
    reason: Literal["end", "interrupt"]
    resumed: bool
    start_position: int = Field(description="Raw stream position this call started from.")
    final_position: int = Field(description="Raw stream position of the last checkpoint (first unfinished record).")
    samples_trained: int = Field(description="Whole run, all calls.")
    samples_filtered: int
    filter_reasons: FilterReasons = Field(default_factory=FilterReasons,
                                          description="samples_filtered by reason (whole run).")
    samples_failed: int
    tokens: int
    patterns_learned: list[int] = Field(description="Learns per level, whole run.")
    new_samples: int = Field(description="Samples finished by this call.")
    new_tokens: int
    elapsed_seconds: float = Field(description="This call.")
    samples_per_second: float
    tokens_per_second: float
    num_workers: int
    checkpoints_written: int
    last_checkpoint: Path | None
    server_url: str
    server_idempotency: bool
    failures: list[FailedSample]
    history: list[ProgressPoint]
