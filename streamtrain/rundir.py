"""The run folder's one owner: what lives in ``<checkpoint_dir>/<run_name>/`` and how it is moved aside.

    ckpt-NNNNNNNN.json   checkpoints (records/checkpoint.py), the newest ``keep_checkpoints`` kept
    journal.jsonl        what the trainer did since the last checkpoint (records/journal.py)
    metrics.jsonl        the run's history, one row per event (records/metrics.py)
    kb.sqlite3           the embedded server's knowledge base (with -wal/-shm while it runs)
    server.log           the embedded server's log
    .lock                held by the one process that trains the run
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from .errors import CheckpointError, StreamtrainError
from .records.checkpoint import CheckpointStore
from .records.journal import FILENAME as JOURNAL_FILENAME
from .records.journal import read_journal

logger = logging.getLogger(__name__)


class RunDir:
    """One run's folder."""

    def __init__(self, path: Path | str, keep: int = 3) -> None:
        self.path = Path(path)
        self.checkpoints = CheckpointStore(self.path, keep=keep)

    @property
    def journal_path(self) -> Path:
        return self.path / JOURNAL_FILENAME

    @property
    def kb_path(self) -> Path:
        return self.path / "kb.sqlite3"

    @property
    def server_log_path(self) -> Path:
        return self.path / "server.log"

    def is_empty(self) -> bool:
        return not self.path.exists() or not any(self.path.iterdir())

    def has_progress(self) -> bool:
        """Whether anything of this run may have reached a server: a checkpoint past the start, or a journal with
        a sample's line. A run that failed before its first sample (a typo in data_files) has none, so its config
        is not pinned. Anything unreadable counts as progress: never guess in the direction that loses work."""
        try:
            found = self.checkpoints.latest_with_path()
            if found is not None and found[0].has_progress:
                return True
            return bool(read_journal(self.journal_path).samples)
        except StreamtrainError:
            return True

    def clear_unpinned(self) -> None:
        """Remove the checkpoints and journal of a run that has no progress (its knowledge base holds nothing
        of it), so a fresh start needs no move-aside."""
        for _, path in self.checkpoints.paths():
            path.unlink(missing_ok=True)
        self.journal_path.unlink(missing_ok=True)

    def start_fresh(self, run_name: str, move_aside: bool) -> None:
        """Make room for a fresh start: nothing to do in an empty folder; a run that trained nothing loses its
        files (they pin nothing); any other run is moved aside when asked to, else refused."""
        if self.is_empty():
            return
        if not self.has_progress():  # nothing of it reached a server
            self.clear_unpinned()
            return
        if not move_aside:
            raise CheckpointError(
                f"run '{run_name}' already has files in {self.path} (checkpoints, journal or knowledge base): "
                "a fresh start would mix with them. Resume instead (drop --fresh), use a new run_name, or let "
                "streamtrain move the folder aside (--fresh --move-aside / fresh=True, move_aside=True)."
            )
        self.move_aside()

    def move_aside(self) -> Path | None:
        """Rename the folder to ``<run_name>.moved-<UTC time>``; None when there was nothing to move."""
        if self.is_empty():
            return None
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.moved-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.moved-{stamp}-{n}")
        try:
            os.replace(self.path, target)
        except OSError as exc:
            raise CheckpointError(f"cannot move the run folder {self.path} aside: {exc.strerror or exc}") from None
        logger.warning("moved the previous run folder %s aside to %s", self.path, target)
        return target
