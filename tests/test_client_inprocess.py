"""KatoClient and NodeSession against the embedded server in-process: starlette's TestClient is an httpx.Client,
so ``KatoClient(http=TestClient(create_app(...)))`` drives the real app with no port and no thread.

Plain contract checks only; faults, crashes and restarts go through real server processes (test_client_faults.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from budgets import FAST
from fastapi.testclient import TestClient

from streamtrain.client import KatoClient
from streamtrain.client.exactly_once import NodeSession
from streamtrain.errors import (
    ConfigError,
    KeyAlreadyUsed,
    ProtocolError,
    SessionNotFound,
)
from streamtrain.patterns import pattern_name
from streamtrain.server import create_app

TRAIN_CONFIG = {"max_pattern_length": 0, "process_predictions": False}
UNIT = [["to"], ["be"], ["or"], ["not"]]


def in_process(tmp_path: Path, **app_options: object) -> Iterator[KatoClient]:
    app = create_app(tmp_path / "kb.sqlite3", **app_options)  # type: ignore[arg-type]
    with TestClient(app, base_url="http://embedded") as http, KatoClient("http://embedded", http=http,
                                                                          settings=FAST) as client:
        yield client


@pytest.fixture(params=[True, False], ids=["idempotent", "no-idempotency"])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KatoClient]:
    yield from in_process(tmp_path, idempotency=request.param)


def test_a_unit_is_learned_once_in_process(client: KatoClient) -> None:
    """Each protocol learns the unit as one pattern, frequency 1, and the mode follows the server's GET /."""
    node = NodeSession(client, "ip-L0", TRAIN_CONFIG)
    assert node.learn_unit(UNIT, "run/ip-L0/0/0/0") == pattern_name(UNIT)
    assert node.mode == ("keys" if client.supports_idempotency else "counter")
    found = client.pattern("ip-L0", pattern_name(UNIT))
    assert found is not None and found.frequency == 1
    node.close()


def test_errors_carry_data_in_process(tmp_path: Path) -> None:
    """The embedded server's answers become errors whose attributes say what happened (no message parsing)."""
    for client in in_process(tmp_path):
        sid = client.create_session("ip-L0", TRAIN_CONFIG).session_id
        client.observe_sequence(sid, UNIT, learn_at_end=True, idempotency_key="k-1")
        other = client.create_session("ip-L0", TRAIN_CONFIG).session_id
        with pytest.raises(KeyAlreadyUsed) as conflict:  # same key, another session: another request
            client.observe_sequence(other, UNIT, learn_at_end=True, idempotency_key="k-1")
        assert conflict.value.key == "k-1" and conflict.value.error_code == "IDEMPOTENCY_KEY_REUSED"
        client.delete_session(sid)
        with pytest.raises(SessionNotFound) as lost:
            client.learn(sid)
        assert lost.value.session_id == sid
        with pytest.raises(SessionNotFound):
            client.get_session(sid)
        with pytest.raises(ProtocolError) as empty:
            client.learn(other)  # an empty STM: 400
        assert empty.value.status_code == 400
        assert client.supports_nodes


def test_http_and_transport_are_exclusive(tmp_path: Path) -> None:
    import httpx

    with pytest.raises(ConfigError, match="not both"):
        KatoClient("http://embedded", http=httpx.Client(), transport=httpx.MockTransport(lambda r: httpx.Response(200)))
