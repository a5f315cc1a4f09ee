"""Every error streamtrain raises on purpose.

    StreamtrainError                 catch this to catch them all
     + ConfigError                   a config file or value is wrong (lists every bad field)
     + ResumeMismatch                a checkpoint was made with a config that differs where it matters
     + CheckpointError               a checkpoint folder or file cannot be read or written
        + JournalDamaged             a journal line is damaged, not just torn
     + KnowledgeBaseMismatch         the server's knowledge base lacks what the checkpoint says it holds
     + DatasetChanged                the dataset's files differ from the ones the checkpoint was written on
     + DatasetError                  the dataset cannot be opened or has no usable text field
     + TokenizerUnavailable          the asked-for tokenizer's files are not on this machine
     + ServerError                   anything between the client and a KATO server
        + ServerUnavailable          the server did not answer within the retry budget
        + ProtocolError              the server answered something the API does not allow
           + ConfigRejected          the server silently dropped or changed a session config
        + SessionLost                a session vanished and could not be recovered
        + AmbiguousEffect            a mutating call's effect cannot be decided from server state
     + TooManyFailures               a run stopped because max_failures samples failed

Messages say what is wrong, where, and what to do about it.
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


class KnowledgeBaseMismatch(StreamtrainError):
    """The server's knowledge base holds less than the run's checkpoint says it must (deleted, swapped, cleared)."""


class DatasetChanged(StreamtrainError):
    """The dataset's resolved files differ from those the run's checkpoint was written on."""


class DatasetError(StreamtrainError):
    """The dataset cannot be opened, or no record carries the text field."""


class TokenizerUnavailable(StreamtrainError):
    """The tokenizer needs files that are not available offline."""


class ServerError(StreamtrainError):
    """A problem talking to a KATO server."""


class ServerUnavailable(ServerError):
    """The server could not be reached or kept failing for the whole retry budget."""


class ProtocolError(ServerError):
    """The server's answer breaks the API contract (unexpected status or body).

    ``status_code`` is the HTTP status of the answer, when there was one.
    """

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ConfigRejected(ProtocolError):
    """The server's effective session config differs from the one asked for."""


class SessionLost(ServerError):
    """A session disappeared and could not be recreated."""


class AmbiguousEffect(ServerError):
    """A mutating request went unanswered and server state cannot tell whether it took effect."""


class TooManyFailures(StreamtrainError):
    """More samples failed than the run's max_failures allows."""
