"""Root conftest: `pytest --nbmake notebooks` runs the suite in a scratch folder, never in the user's checkpoints/ or data/.

Kernels inherit this process's environment, and every notebook reads its folders from ST_* variables (see each
notebook's parameters cell). The three notebooks share one run in this session's folder, as they share one in
checkpoints/ when opened with `make lab`. A variable already set (e.g. by CI) wins.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_scratch = Path(tempfile.mkdtemp(prefix="streamtrain-notebooks-"))
atexit.register(shutil.rmtree, _scratch, ignore_errors=True)

os.environ.setdefault("ST_CHECKPOINT_DIR", str(_scratch / "checkpoints"))
os.environ.setdefault("ST_DATA_DIR", str(_scratch / "data" / "demo"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
