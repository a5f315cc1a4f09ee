"""The embedded server's defaults and names shared by its launcher, command line and app (a module that imports only
``streamtrain.limits``, which imports nothing: reading them loads nothing heavy)."""

# The request size limits live with what the client sends, in one module both sides read.
from streamtrain.limits import DEFAULT_MAX_BATCH_ITEMS, DEFAULT_MAX_BODY_BYTES

__all__ = ["DEFAULT_HEADER_TIMEOUT", "DEFAULT_IDEMPOTENCY_TTL", "DEFAULT_MAX_BATCH_ITEMS", "DEFAULT_MAX_BODY_BYTES",
           "EXIT_STORAGE", "KATO_VERSION", "MIN_UPLOAD_RATE", "TOKEN_ENV"]

KATO_VERSION = "3.10.1"
DEFAULT_IDEMPOTENCY_TTL = 24 * 3600.0

#: Environment variable holding the bearer token the server requires (the same name a run config reads its
#: server_token from, so one exported variable serves both sides).
TOKEN_ENV = "STREAMTRAIN_SERVER_TOKEN"

# A request's line and headers must arrive within this many seconds, its body within as long again plus its size
# at MIN_UPLOAD_RATE bytes per second (deadlines.py).
DEFAULT_HEADER_TIMEOUT = 5.0
MIN_UPLOAD_RATE = 1_000_000

# The server's exit status when it cannot write its database or lock file (disk full, read-only): sysexits' EX_IOERR.
# Its launcher reads it as "the disk", even when the reason could not be written to the log (a full disk).
EXIT_STORAGE = 74
