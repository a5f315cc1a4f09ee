"""The embedded server's defaults and names shared by its launcher, command line and app (a module with no imports:
reading them loads nothing heavy)."""

KATO_VERSION = "3.10.1"
DEFAULT_IDEMPOTENCY_TTL = 24 * 3600.0
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# Items of one POST /learn-batch (or of all batches of one POST /learn-batches). The trainer sends one sample per
# batch and splits a sample of more than streamtrain.client.LEARN_BATCH_PART items (10,000) into parts, so this
# stays well above what it sends.
DEFAULT_MAX_BATCH_ITEMS = 20_000

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
