"""The fault proxy does what its fault kinds promise, against the embedded server (applied or not, as seen
by the client), and it is reproducible from its seed (against the session-wide server without idempotency keys
of conftest.py: the proxy needs a real port; each test uses its own session). Also, in-process: a server
started with a bearer token."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from budgets import FAST
from fastapi.testclient import TestClient
from faultproxy import KINDS, FaultProxy

from streamtrain.client import KatoClient
from streamtrain.errors import ProtocolError
from streamtrain.server import EmbeddedServer, create_app

# kind -> (what the client sees, whether the observe was applied)
EXPECTED = {
    "drop_before": (httpx.RemoteProtocolError, False),
    "drop_after": (httpx.RemoteProtocolError, True),
    "503": (503, False),
    "429": (429, False),
    "stall": (httpx.ReadTimeout, False),
    "stall_after": (httpx.ReadTimeout, True),
}


@pytest.mark.parametrize("kind", KINDS)
def test_each_fault_kind(server_without_idempotency: EmbeddedServer, kind: str) -> None:
    url = server_without_idempotency.url
    seen, applied = EXPECTED[kind]
    with KatoClient(url, settings=FAST) as direct:
        sid = direct.create_session("proxy-node", {"process_predictions": False}).session_id
        with FaultProxy(url, fault_rate=1.0, kinds=(kind,), retry_after="7", stall_seconds=1.0) as proxy, \
                httpx.Client(base_url=proxy.url, timeout=httpx.Timeout(1.0, read=0.5)) as raw:
            request = lambda: raw.post(f"/sessions/{sid}/observe", json={"strings": ["a"]})  # noqa: E731
            if isinstance(seen, int):
                answer = request()
                assert answer.status_code == seen and answer.headers["Retry-After"] == "7"
            else:
                with pytest.raises(seen):
                    request()
            assert proxy.counts == {"requests": 1, kind: 1}
        assert direct.stm(sid) == ([["a"]] if applied else [])


def test_no_faults_forwards_everything_on_one_keep_alive_connection(server_without_idempotency: EmbeddedServer) -> None:
    url = server_without_idempotency.url
    with FaultProxy(url, fault_rate=0.0) as proxy, KatoClient(proxy.url, settings=FAST) as client:
        sid = client.create_session("proxy-node", {"process_predictions": False}).session_id
        for i in range(20):
            client.observe(sid, [f"s{i}"])
        assert len(client.stm(sid)) == 20
        assert proxy.counts == {"requests": 22, "forwarded": 22}


def test_same_seed_same_faults(server_without_idempotency: EmbeddedServer) -> None:
    """The decisions depend only on the seed and the order of requests."""
    url = server_without_idempotency.url
    runs = []
    for seed in (3, 3, 4):
        with FaultProxy(url, fault_rate=0.5, seed=seed, kinds=("503", "429")) as proxy, \
                httpx.Client(base_url=proxy.url) as raw:
            runs.append([raw.get("/health").status_code for _ in range(30)])
    assert runs[0] == runs[1] != runs[2]
    assert set(runs[0]) == {200, 429, 503}


def test_max_faults_bounds_the_injection(server_without_idempotency: EmbeddedServer) -> None:
    url = server_without_idempotency.url
    with FaultProxy(url, fault_rate=1.0, kinds=("503",), max_faults=3) as proxy, \
            httpx.Client(base_url=proxy.url) as raw:
        codes = [raw.get("/health").status_code for _ in range(6)]
    assert codes == [503, 503, 503, 200, 200, 200]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="kinds"):
        FaultProxy("http://127.0.0.1:1", kinds=("explode",))
    with pytest.raises(ValueError, match="fault_rate"):
        FaultProxy("http://127.0.0.1:1", fault_rate=2)


def test_bearer_token(tmp_path: Path) -> None:
    """A server started with a token serves a client that sends it and refuses one that does not."""
    app = create_app(tmp_path / "kb.db", token="s3cret")
    with TestClient(app, base_url="http://embedded") as http, \
            KatoClient("http://embedded", token="s3cret", http=http, settings=FAST) as good:
        assert good.nodes() == []
    with TestClient(app, base_url="http://embedded") as http, KatoClient("http://embedded", http=http,
                                                                          settings=FAST) as bad, \
            pytest.raises(ProtocolError, match="401"):
        bad.nodes()
