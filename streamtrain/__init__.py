"""streamtrain: train a KATO-style symbolic memory server from streamed text datasets, exactly once."""

from __future__ import annotations

__version__ = "0.1.0"

from .config import ClientConfig, DatasetConfig, LayerConfig, RunConfig, load_config, parse_config
from .errors import (
    AmbiguousEffect,
    CheckpointError,
    ConfigError,
    ConfigRejected,
    DatasetError,
    ProtocolError,
    ResumeMismatch,
    ServerError,
    ServerUnavailable,
    SessionLost,
    StreamtrainError,
    TokenizerUnavailable,
    TooManyFailures,
)

__all__ = [
    "AmbiguousEffect",
    "CheckpointError",
    "ClientConfig",
    "ConfigError",
    "ConfigRejected",
    "DatasetConfig",
    "DatasetError",
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
