"""The dataset's record in a checkpoint: the files of the run's split, in stream order, each fingerprinted.

Resolving a config's files into one of these and comparing two of them is ``data/datafiles.py``'s (which says what
a resume allows to change); this module is the format only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DataFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="As resolved by datasets (absolute local path, or a URL pinned to a revision).")
    size: int | None = Field(None, description="Bytes, for a local file.")
    fingerprint: str | None = Field(None, description="sha256 of size, first and last 64 KiB, for a local file.")

    @property
    def identity(self) -> str:
        return self.fingerprint or self.path


class DatasetRecord(BaseModel):
    """The files of the run's split, in stream order."""

    model_config = ConfigDict(extra="forbid")

    files: list[DataFile] = Field(default_factory=list)
