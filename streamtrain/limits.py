"""How big a learn-batch request may be: what the trainer and ``KatoClient`` send, what the embedded server accepts.

One module that both sides read (it imports nothing: the server's command line and the launcher load it for free).
What the client sends stays well inside what a default server accepts: ``tests/test_wire_contract.py`` checks it.
The request bodies themselves are in ``wire.py``.
"""

# ---- what the client sends

#: The trainer packs whole samples into one learn-batch(es) request up to this many items (steps, every level) and
#: this many bytes of JSON (estimated: ``worker.batch_parts``); a bigger sample goes in several keyed parts.
TRAINER_MAX_ITEMS = 1000
TRAINER_MAX_BYTES = 1 << 20

#: ``KatoClient.learn_batch`` sends more items than this in parts of this size, part ``i`` keyed ``<key>/<i>``.
#: Never read from the server: a batch sent again after a crash must be cut into the same parts under the same keys.
LEARN_BATCH_PART = 10_000

# ---- what the embedded server accepts (its --max-batch-items and --max-body-bytes; 413 above them)

#: Items of one POST /learn-batch, or of all batches of one POST /learn-batches together.
DEFAULT_MAX_BATCH_ITEMS = 20_000
#: Bytes of any request body.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
