"""Steps in doubt across time: what a resume can still decide exactly after hours or days.

A sample in flight when its trainer stopped (a step line in the journal, no ``fin`` line) has a last request that
may or may not have taken effect. A resume decides it from what the server kept:

* a keyed step (phases ``keyed``, ``batch``, ``batches``: the embedded server) is sent again under the same
  idempotency key, which the server answers from its record, but only while it holds the key: for its key lifetime
  (``--idempotency-ttl``, 24 h by default), and unless a sweep of a server with a shorter lifetime removed it;
* a counted step (phases ``learn``, ``counted``: a real KATO) is decided from its training session, which lives
  ``SESSION_TTL_SECONDS`` (24 h); once the session is gone the knowledge base decides (a missing pattern is
  sent again; a present one stops the run with AmbiguousEffect), never silently.

The journal dates each step line (``at``), so a resume knows how long its doubts have waited:

* the trainer's own embedded server starts with a key lifetime that covers its journal's oldest keyed step in
  doubt (``embedded_server_args``): a run stopped on Friday resumes exactly on Monday;
* a resume whose keyed steps may have outlived the server's keys is refused (``StepsInDoubt``), naming the
  samples, their age, the server's lifetime and the ways out, unless told to send them again anyway (``resend``);
* counted steps older than the session lifetime are said (a warning): the knowledge base decides them.

A line of an older streamtrain has no ``at``: it is dated by the journal file's modification time, the latest it
can have been written.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import StepsInDoubt
from .records.journal import SampleRecord, read_journal
from .server.defaults import DEFAULT_IDEMPOTENCY_TTL
from .wire import ServiceInfo

logger = logging.getLogger(__name__)

# Training sessions live a day (the idempotency keys' default lifetime too): a trainer killed mid-step and resumed
# within that time can still read its old sessions' STM to decide whether the step took effect (the workers open
# them with this lifetime).
SESSION_TTL_SECONDS = 86400

KEYED_PHASES = frozenset({"keyed", "batch", "batches"})
SESSION_PHASES = frozenset({"learn", "counted"})
#: A step this close to a lifetime counts as past it: the server's clock may differ from the trainer's.
MARGIN_SECONDS = 3600.0


@dataclass(frozen=True)
class Doubt:
    raw_index: int
    phase: str
    at: float  # when its last step line was written, in seconds since the epoch


def journal_time(path: Path) -> float:
    """When the journal was last written: the date of its undated lines (an older streamtrain's)."""
    try:
        return os.stat(path).st_mtime
    except OSError:
        return time.time()


def doubts(samples: Mapping[int, SampleRecord], undated: float) -> list[Doubt]:
    """The samples whose last request may or may not have taken effect: a learn or keyed step sent, no fin line
    (phase ``observe``: the learn was never sent, nothing is in doubt)."""
    return [Doubt(s, str(rec.last_phase), float(rec.last_at) if rec.last_at is not None else undated)
            for s, rec in sorted(samples.items())
            if rec.finished is None and rec.last_phase in KEYED_PHASES | SESSION_PHASES]


def embedded_server_args(journal_path: Path, now: float | None = None) -> list[str]:
    """Arguments for the trainer's own embedded server: with keyed steps in doubt in the journal, a key lifetime
    of their age plus the default (the replays come first; the rest of the call gets a full day too). The server is
    the run's own, so its key lifetime is the trainer's choice."""
    keyed = [d for d in doubts(read_journal(journal_path).samples, journal_time(journal_path))
             if d.phase in KEYED_PHASES]
    if not keyed:
        return []
    age = (time.time() if now is None else now) - min(d.at for d in keyed)
    if age <= 0:
        return []
    lifetime = math.ceil(age + DEFAULT_IDEMPOTENCY_TTL)
    logger.info("steps in doubt since %s ago: the embedded server keeps idempotency keys for %s", span(age),
                span(lifetime))
    return ["--idempotency-ttl", str(lifetime)]


def check(records: Mapping[int, SampleRecord], info: ServiceInfo | None, *, run_name: str, journal_path: Path,
          embedded: bool, resend: bool, now: float | None = None) -> None:
    """Refuse a resume whose keyed steps in doubt may have outlived the server's keys (StepsInDoubt), unless
    ``resend``; say when counted steps outlived their sessions. ``info``: the server's ``GET /``."""
    found = doubts(records, journal_time(journal_path))
    if not found:
        return
    now = time.time() if now is None else now
    oldest = now - min(d.at for d in found)
    logger.info("run %s: the last requests of %d sample(s) in doubt were sent up to %s ago", run_name, len(found),
                span(oldest))
    keyed = [d for d in found if d.phase in KEYED_PHASES]
    stated = info.idempotency_ttl_seconds if info is not None else None
    lifetime = stated or DEFAULT_IDEMPOTENCY_TTL
    since = info.idempotency_keys_since if info is not None else None
    gone = [d for d in keyed
            if now - d.at > lifetime - MARGIN_SECONDS or (since is not None and d.at - MARGIN_SECONDS < since)]
    if gone and resend:
        logger.warning("run %s: sending %d sample(s) in doubt again although the server may no longer hold their "
                       "keys (--resend-in-doubt): raw records %s may be learned twice", run_name, len(gone),
                       _list(gone))
    elif gone:
        raise StepsInDoubt(_refusal(gone, now, lifetime, stated is not None, since, run_name, journal_path, embedded),
                           raw_indices=[d.raw_index for d in gone], age_seconds=now - min(d.at for d in gone),
                           lifetime_seconds=lifetime)
    stale = [d for d in found if d.phase in SESSION_PHASES and now - d.at > SESSION_TTL_SECONDS - MARGIN_SECONDS]
    if stale:
        logger.warning("run %s: %d sample(s) in flight for %s, longer than training sessions live (%s): raw records "
                       "%s are decided from the knowledge base (a missing pattern is sent again; a present one stops "
                       "the run with AmbiguousEffect, never a silent second learn)", run_name, len(stale),
                       span(now - min(d.at for d in stale)), span(SESSION_TTL_SECONDS), _list(stale))


def _refusal(gone: list[Doubt], now: float, lifetime: float, stated: bool, since: float | None, run_name: str,
             journal_path: Path, embedded: bool) -> str:
    age = now - min(d.at for d in gone)
    swept = since is not None and min(d.at for d in gone) - MARGIN_SECONDS < since
    keeps = (f"keeps keys for {span(lifetime)}" + ("" if stated else " (assumed: its GET / does not say)")
             + (f", and has removed those older than {_when(since)}" if swept and since is not None else ""))
    ways = []
    if not swept and not embedded:
        ways.append(f"if the server still holds its keys (it removed none of them yet), restart it with "
                    f"--idempotency-ttl {math.ceil((age + DEFAULT_IDEMPOTENCY_TTL) / 3600) * 3600} or more and run "
                    "the same command again")
    ways.append(f"accept that these {len(gone)} sample(s) may be learned twice: run the same command with "
                "--resend-in-doubt (train(..., resend_in_doubt=True))")
    ways.append("or start the run over: streamtrain train --fresh --move-aside")
    return (f"cannot resume run '{run_name}' exactly: {len(gone)} sample(s) were in flight when its last trainer "
            f"stopped, their last requests sent {span(age)} ago (raw records {_list(gone)}; journal {journal_path}), "
            "and they may have taken effect without an answer. The server decides such a request by its idempotency "
            f"key, but it {keeps}, so it may no longer know them: sending these samples again could learn them twice."
            "\nWays out:\n  - " + "\n  - ".join(ways))


def _list(found: list[Doubt], most: int = 10) -> str:
    shown = ", ".join(str(d.raw_index) for d in found[:most])
    return shown + (f" and {len(found) - most} more" if len(found) > most else "")


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def span(seconds: float) -> str:
    """A time span for people, in the units a lifetime is thought in: "3 d 2 h", "26 h", "5 h 10 min", "40 min",
    "12 s"."""
    s = max(0, int(seconds))
    days, hours, minutes = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if days >= 2:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if s >= 3600:
        return f"{s // 3600} h {minutes} min" if minutes else f"{s // 3600} h"
    return f"{minutes} min" if s >= 60 else f"{s} s"
