"""streamtrain: train a KATO-style symbolic memory server from streamed text datasets, exactly once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ClientConfig, DatasetConfig, HFTokenizer, LayerConfig, RunConfig, load_config, parse_config
from .errors import (
    AmbiguousEffect,
    CheckpointError,
    ConfigError,
    ConfigRejected,
    DatasetChanged,
    DatasetError,
    JournalDamaged,
    KnowledgeBaseMismatch,
    ProtocolError,
    ResumeMismatch,
    ServerError,
    ServerUnavailable,
    SessionLost,
    StreamtrainError,
    TokenizerUnavailable,
    TooManyFailures,
)
from .version import __version__

# Heavy parts (datasets, httpx, FastAPI) load on first use, so `import streamtrain` and the CLI stay fast.
_LAZY = {
    "train": "trainer",
    "train_parallel": "trainer",
    "TrainResult": "results",
    "Checkpoint": "records.checkpoint",
    "CheckpointStore": "records.checkpoint",
    "DatasetStream": "data.stream",
    "get_tokenizer": "data.tokenization",
    "KatoClient": "client",
    "NodeSession": "client.exactly_once",
    "EmbeddedServer": "server",
}


if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors (nothing is imported at run time)
    from .client import KatoClient
    from .client.exactly_once import NodeSession
    from .data.stream import DatasetStream
    from .data.tokenization import get_tokenizer
    from .records.checkpoint import Checkpoint, CheckpointStore
    from .results import TrainResult
    from .server import EmbeddedServer
    from .trainer import train, train_parallel


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'streamtrain' has no attribute {name!r}")


__all__ = [
    "Checkpoint",
    "CheckpointStore",
    "DatasetStream",
    "EmbeddedServer",
    "KatoClient",
    "NodeSession",
    "TrainResult",
    "get_tokenizer",
    "train",
    "train_parallel",
    "AmbiguousEffect",
    "CheckpointError",
    "ClientConfig",
    "ConfigError",
    "ConfigRejected",
    "DatasetChanged",
    "DatasetConfig",
    "DatasetError",
    "JournalDamaged",
    "KnowledgeBaseMismatch",
    "HFTokenizer",
    "LayerConfig",
    "ProtocolError",
    "ResumeMismatch",
    "RunConfig",
    "ServerError",
    "ServerUnavailable",
    "SessionLost",
    "StreamtrainError",
    "TokenizerUnavailable",
    "TooManyFailures",
    "__version__",
    "load_config",
    "parse_config",
]
