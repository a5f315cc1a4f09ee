"""The formats a run writes to disk and a resume reads back: pydantic models and their files, no HTTP.

* ``checkpoint.py``: the checkpoint (one versioned JSON file, written atomically) and the store of a run's ones.
* ``journal.py``: what the trainer did since the last checkpoint, one JSON line per step.
* ``metrics.py``: the run's history, one JSON line per event (``metrics.jsonl``).
* ``knowledge_base.py`` and ``dataset.py``: what a checkpoint records of the knowledge base and of the dataset's
  files, checked on resume (by ``kbcheck.py`` and ``data/datafiles.py``, which read the server and the files).

Nothing under this package reaches httpx, tenacity, the client side or the server (``tests/test_layering.py``):
reading a checkpoint (``streamtrain inspect``, a notebook) loads no HTTP stack.
"""
