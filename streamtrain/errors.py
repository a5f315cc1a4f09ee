"""Every error streamtrain raises on purpose.

    StreamtrainError                 catch this to catch them all
     + ConfigError                   a config file or value is wrong (lists every bad field)
     + ResumeMismatch                a checkpoint was made with a config that differs where it matters
     + CheckpointError               a checkpoint folder or file cannot be read or written
        + JournalDamaged             a journal line is damaged, not just torn
        + DiskError                  a file of the run cannot be written: its disk is full or read-only
     + KnowledgeBaseMismatch         the server's knowledge base lacks what the checkpoint says it holds,
                                     on resume or during a call (the run is rolled back then)
     + DatasetChanged                the dataset's files differ from the ones the checkpoint was written on
     + DatasetError                  the dataset cannot be opened or read, or has no usable text field
        + DataEndsEarly              the data ends before the raw position a run resumes at
     + TokenizerUnavailable          the asked-for tokenizer's files are not on this machine
     + ServerError                   anything between the client and a KATO server
        + ServerUnavailable          the server did not answer within the retry budget
        + ProtocolError              the server answered something the API does not allow
           + ConfigRejected          the server silently dropped or changed a session config
           + KeyAlreadyUsed          a keyed request's key was already applied to another request
        + SessionLost                a session vanished and could not be recovered
           + SessionNotFound         one answer: 404 SESSION_NOT_FOUND (proves that request was not applied)
        + AmbiguousEffect            a mutating call's effect cannot be decided from server state
           + MaybeApplied            an unkeyed mutating request went unanswered; it was not resent
     + TooManyFailures               a run stopped because max_failures samples failed
     + StepsInDoubt                  a resume's in-flight steps outlived what the server keeps to decide them

Messages say what is wrong, where, and what to do about it. Code never reads a message: what a caller
may act on is an attribute (``status_code``, ``error_code``, ``session_id``, ``attempts``, ``last_cause``).
"""

from __future__ import annotations


class StreamtrainError(Exception):
    """Base class: ``except StreamtrainError`` catches every deliberate streamtrain error."""


class ConfigError(StreamtrainError):
    """A run configuration (file or values) is invalid."""


class ResumeMismatch(StreamtrainError):
    """The checkpoint of a run was written with a config that differs in a must-match field."""


class CheckpointError(StreamtrainError):
    """A checkpoint folder or file cannot be read or written."""


class JournalDamaged(CheckpointError):
    """A line of a run's journal is neither valid nor a torn last line."""


class DiskError(CheckpointError):
    """A file of the run (checkpoint, journal, lock, the embedded server's log) cannot be written because of its
    disk: full, over quota, past the process's file-size limit, read-only, or not writable.

    ``path``: the file; ``mount``: the mount point of its disk. The message names both, the free space, and what
    to do; the last good checkpoint is untouched, so the same command resumes once the disk is fixed.
    """

    def __init__(self, message: str, *, path: str, mount: str) -> None:
        super().__init__(message)
        self.path = path
        self.mount = mount


class KnowledgeBaseMismatch(StreamtrainError):
    """The server's knowledge base holds less than the run's checkpoint says it must (deleted, swapped, cleared),
    found on resume or during a call.

    ``problems``: one line per shortfall (the database id or the node, what was expected, what was found).
    """

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


class DatasetChanged(StreamtrainError):
    """The dataset's resolved files differ from those the run's checkpoint was written on."""


class DatasetError(StreamtrainError):
    """The dataset cannot be opened or read, or the run's first records hold no usable text in the text field."""


class DataEndsEarly(DatasetError):
    """The data ends before the raw position a stream was to start at (a resume past the end of the data).

    ``position``: that position; ``end``: the number of raw records the data holds.
    """

    def __init__(self, message: str, *, position: int, end: int) -> None:
        super().__init__(message)
        self.position = position
        self.end = end


class TokenizerUnavailable(StreamtrainError):
    """The tokenizer needs files that are not available offline."""


class ServerError(StreamtrainError):
    """A problem talking to a KATO server."""


class ServerUnavailable(ServerError):
    """The server could not be reached or kept failing for the whole retry budget.

    ``attempts``: how many times the call was sent (None when no call was counted, e.g. a server that did not
    start); ``last_cause``: the last failure, e.g. ``"ConnectError: ..."`` or ``"HTTP 503"``.
    """

    def __init__(self, message: str, *, attempts: int | None = None, last_cause: str | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_cause = last_cause


class ProtocolError(ServerError):
    """The server's answer breaks the API contract (unexpected status or body).

    ``status_code`` is the HTTP status of the answer, when there was one; ``error_code`` the code of a
    structured error body (``{"error": {"code": ...}}``, e.g. ``"NODE_UNKNOWN"``), when it had one.
    """

    def __init__(self, message: str, *, status_code: int | None = None, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_code = error_code


class ConfigRejected(ProtocolError):
    """The server's effective session config differs from the one asked for."""


class KeyAlreadyUsed(ProtocolError):
    """A keyed request was refused (422 ``IDEMPOTENCY_KEY_REUSED``): its key was already applied to another request.
    The key is an ``Idempotency-Key``, or a batch key of ``POST /learn-batches`` applied to other items.

    The embedded server fingerprints method, path and body. The same unit sent to a new session (a trainer
    resuming after its crash) has another path, so the refusal means the key was applied, under another session.
    ``key`` is the refused key.
    """

    def __init__(self, message: str, *, key: str, status_code: int | None = 422,
                 error_code: str | None = "IDEMPOTENCY_KEY_REUSED") -> None:
        super().__init__(message, status_code=status_code, error_code=error_code)
        self.key = key


class SessionLost(ServerError):
    """A session disappeared and could not be recreated."""


class SessionNotFound(SessionLost):
    """The server answered 404 SESSION_NOT_FOUND for ``session_id``: it expired or was never there.

    A 404 answer proves the request was not applied (the server checks the session before it acts).
    """

    def __init__(self, message: str, session_id: str) -> None:
        super().__init__(message)
        self.session_id = session_id


class AmbiguousEffect(ServerError):
    """A mutating request went unanswered and server state cannot tell whether it took effect."""


class MaybeApplied(AmbiguousEffect):
    """An unkeyed mutating request went unanswered in a way that may have reached the server; it was not resent.

    ``attempts``: how many times it was sent (the last copy may have been applied); ``last_cause``: the last
    failure. ``NodeSession`` decides from server state; a direct caller gets an honest AmbiguousEffect.
    """

    def __init__(self, message: str, *, attempts: int, last_cause: str) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_cause = last_cause


class TooManyFailures(StreamtrainError):
    """More samples failed than the run's max_failures allows."""


class StepsInDoubt(StreamtrainError):
    """A resumed run's in-flight samples (their last request sent, no answer) waited longer than the server keeps
    what decides them exactly (its idempotency keys), so sending them again could learn them twice.

    ``raw_indices``: the samples; ``age_seconds``: how long the oldest has waited; ``lifetime_seconds``: the
    server's key lifetime. The message names the ways out.
    """

    def __init__(self, message: str, *, raw_indices: list[int], age_seconds: float, lifetime_seconds: float) -> None:
        super().__init__(message)
        self.raw_indices = raw_indices
        self.age_seconds = age_seconds
        self.lifetime_seconds = lifetime_seconds
