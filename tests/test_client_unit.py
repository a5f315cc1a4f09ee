"""KatoClient and NodeSession edge cases that a real peer cannot produce on demand (httpx.MockTransport).

The end-to-end behaviour against the embedded server through real faults is in test_client_faults.py.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from budgets import FAST

from streamtrain.client import KatoClient
from streamtrain.client.exactly_once import NodeSession, unit_took_effect
from streamtrain.client.outage import OutageTracker
from streamtrain.client.retry import Transient, is_retryable, parse_retry_after
from streamtrain.config import ClientConfig
from streamtrain.errors import (
    AmbiguousEffect,
    ConfigError,
    ConfigRejected,
    KeyAlreadyUsed,
    MaybeApplied,
    ProtocolError,
    ServerUnavailable,
    SessionLost,
    SessionNotFound,
)
from streamtrain.patterns import pattern_hash, pattern_name

URL = "http://kato.test"
UNIT = [["the"], ["quick"], ["brown"], ["fox"]]
DEFAULTS = {"max_pattern_length": 0, "persistence": 5, "recall_threshold": 0.1, "max_predictions": 100,
            "process_predictions": True, "stm_mode": "CLEAR"}
TRAIN_CONFIG = {"max_pattern_length": 0, "process_predictions": False, "stm_mode": "CLEAR"}


def not_found(sid: str) -> httpx.Response:
    return httpx.Response(404, json={"error": {"code": "SESSION_NOT_FOUND",
                                               "message": f"Session {sid} not found or expired", "session_id": sid}})


class FakeKato:
    """A tiny in-memory KATO with scripted faults: enough state to check the exactly-once decisions.

    ``faults`` holds (method, path suffix, action) entries; the first matching request consumes one:
    ``lost`` applies the request and loses the answer; ``unsent`` loses it without applying;
    ``lost_and_expire`` applies, then the session vanishes, and the answer is lost; ``expire`` makes the
    session vanish before the request (-> 404); ``swallow`` runs an observe-sequence whose final learn fails
    (KATO logs and swallows it: the events stay in the STM) and ``lost_swallow`` does so and loses the answer.
    ``500`` answers HTTP 500 without applying the request; ``applied_500`` applies it, then answers 500 (KATO stored
    the pattern, then failed: the answer says nothing of what happened).
    Each session keeps KATO's observation counter ``time`` (+1 per observation, kept by a learn, 0 after a clear).
    """

    def __init__(self, *, idempotency: bool = False, reject_config: bool = False) -> None:
        self.idempotency = idempotency
        self.reject_config = reject_config
        self.sessions: dict[str, dict[str, Any]] = {}
        self.kb: Counter[tuple[str, str]] = Counter()
        self.patterns: dict[str, list[list[str]]] = {}
        self.keys: dict[str, tuple[str, bytes, httpx.Response]] = {}
        self.faults: list[tuple[str, str, str]] = []
        self.log: list[str] = []
        self.n = 0
        self.swallow = False

    def client(self, **kw: Any) -> KatoClient:
        return KatoClient(URL, settings=kw.pop("settings", FAST), transport=httpx.MockTransport(self), **kw)

    def _learn(self, node: str, stm: list[list[str]]) -> str:
        if sum(len(e) for e in stm) < 2:
            return ""
        self.kb[(node, pattern_hash(stm))] += 1
        self.patterns[pattern_hash(stm)] = [list(e) for e in stm]
        return pattern_name(stm)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        method, path = request.method, request.url.path
        self.log.append(f"{method} {path}")
        action = None
        for i, (m, suffix, act) in enumerate(self.faults):
            if m == method and path.endswith(suffix):
                action = act
                del self.faults[i]
                break
        if action == "unsent":
            raise httpx.ReadTimeout("timed out", request=request)
        if action == "500":
            return httpx.Response(500, text="Internal Server Error")
        self.swallow = action in ("swallow", "lost_swallow")
        sid_match = re.match(r"^/sessions/([^/]+)", path)
        if action == "expire" and sid_match:
            self.sessions.pop(sid_match.group(1), None)
        key = request.headers.get("idempotency-key") if self.idempotency else None
        if key and key in self.keys:
            stored_path, body, answer = self.keys[key]
            if stored_path == path and body == request.content:
                response = answer
            else:
                detail = f"Idempotency-Key {key!r} was already used for a different request"
                response = httpx.Response(422, json={"detail": detail, "error": {
                    "code": "IDEMPOTENCY_KEY_REUSED", "message": detail}})
        else:
            response = self._route(method, path, request)
            if key and response.status_code < 300:
                self.keys[key] = (path, request.content, response)
        if action == "applied_500":
            return httpx.Response(500, text="Internal Server Error")
        if action in ("lost", "lost_and_expire", "lost_swallow"):
            if action == "lost_and_expire" and sid_match:
                self.sessions.pop(sid_match.group(1), None)
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return response

    def _route(self, method: str, path: str, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        if path == "/":
            return httpx.Response(200, json={"service": "KATO API", "idempotency": self.idempotency})
        if path == "/sessions" and method == "POST":
            self.n += 1
            sid = f"session-{self.n}"
            cfg = dict(DEFAULTS)
            if not self.reject_config:
                cfg.update(body.get("config") or {})
            self.sessions[sid] = {"node": body["node_id"], "stm": [], "config": cfg, "time": 0}
            return httpx.Response(200, json={"session_id": sid, "node_id": body["node_id"], "session_config": cfg})
        if path.startswith("/pattern/"):
            node, name = request.url.params["node_id"], path.rsplit("/", 1)[1]
            if (node, name) not in self.kb:
                return httpx.Response(200, json={"pattern": {"status": "error", "message": "not found"}})
            return httpx.Response(200, json={"pattern": {"status": "okay", "pattern": {
                "name": name, "pattern_data": self.patterns[name], "frequency": self.kb[(node, name)]}},
                "node_id": node + "_kato"})
        sid, _, sub = path[len("/sessions/"):].partition("/")
        s = self.sessions.get(sid)
        if s is None:
            return not_found(sid)
        if method == "DELETE":
            del self.sessions[sid]
            return httpx.Response(200, json={"status": "deleted", "session_id": sid})
        if sub == "stm":
            return httpx.Response(200, json={"stm": s["stm"], "session_id": sid, "length": len(s["stm"])})
        if sub == "cognition-data":
            return httpx.Response(200, json={"cognition_data": {"time": s["time"], "short_term_memory": s["stm"],
                                                                "predictions": []}, "session_id": sid})
        if sub == "clear-stm":
            s["stm"], s["time"] = [], 0
            return httpx.Response(200, json={"status": "cleared", "session_id": sid})
        if sub == "observe-sequence":
            initial, results = len(s["stm"]), []
            for i, o in enumerate(body["observations"]):
                s["stm"].append(sorted(o["strings"]))
                s["time"] += 1
                results.append({"status": "okay", "sequence_position": i, "stm_length": len(s["stm"]),
                                "time": s["time"]})
            final = None
            if body.get("learn_at_end") and not self.swallow:
                final = self._learn(s["node"], s["stm"])
                s["stm"] = []
            return httpx.Response(200, json={"status": "completed", "observations_processed": len(body["observations"]),
                                             "initial_stm_length": initial, "final_stm_length": len(s["stm"]),
                                             "results": results, "final_learned_pattern": final})
        if sub == "learn":
            if not s["stm"]:
                return httpx.Response(400, json={"detail": "Cannot learn from empty STM"})
            name = self._learn(s["node"], s["stm"])
            s["stm"] = []
            return httpx.Response(200, json={"status": "learned", "pattern_name": name, "session_id": sid})
        return httpx.Response(500, text="Internal Server Error")

    def freq(self, node: str, events: list[list[str]]) -> int:
        return self.kb[(node, pattern_hash(events))]


# ---- the retry predicate and the classification of failures -------------------------------------


@pytest.mark.parametrize(
    ("exc", "resend_ambiguous", "expected"),
    [
        (Transient("connect refused", ambiguous=False), False, True),
        (Transient("connect refused", ambiguous=False), True, True),
        (Transient("read timeout", ambiguous=True), False, False),
        (Transient("read timeout", ambiguous=True), True, True),
        (ProtocolError("HTTP 400"), True, False),
        (ValueError("bug"), True, False),
    ],
)
def test_retry_predicate(exc: BaseException, resend_ambiguous: bool, expected: bool) -> None:
    """Only transient failures are retried, and ambiguous ones only where resending is harmless."""
    assert is_retryable(exc, resend_ambiguous=resend_ambiguous) is expected


def scripted(responses: list[Callable[[httpx.Request], httpx.Response] | httpx.Response | Exception]):
    """A MockTransport handler that answers from a script, recording every request it sees."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        step = responses[min(len(seen), len(responses)) - 1]
        if isinstance(step, Exception):
            raise step
        return step(request) if callable(step) else step

    return handler, seen


LEARNED = httpx.Response(200, json={"status": "learned", "pattern_name": "PTRN|x", "session_id": "s"})


@pytest.mark.parametrize(
    "failure",
    [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow connect"), httpx.Response(503, text="busy"),
     httpx.Response(429, text="slow down")],
    ids=["connect-error", "connect-timeout", "503", "429"],
)
def test_unkeyed_learn_is_resent_after_a_failure_that_never_reached_the_app(failure: Any) -> None:
    """A request that surely was not applied is resent even without a key."""
    handler, seen = scripted([failure, LEARNED])
    with KatoClient(URL, settings=FAST, transport=httpx.MockTransport(handler)) as client:
        assert client.learn("s").pattern_name == "PTRN|x"
    assert len(seen) == 2


@pytest.mark.parametrize(
    "failure",
    [httpx.ReadTimeout("timed out"), httpx.RemoteProtocolError("Server disconnected"),
     httpx.ReadError("reset"), httpx.Response(500, text="oops"), httpx.Response(502, text="bad gateway"),
     httpx.Response(504, text="gw timeout")],
    ids=["read-timeout", "disconnected", "read-error", "500", "502", "504"],
)
def test_unkeyed_learn_is_not_resent_after_an_ambiguous_failure(failure: Any) -> None:
    """A learn that may have been applied is surfaced as MaybeApplied after ONE attempt."""
    handler, seen = scripted([failure, LEARNED])
    with KatoClient(URL, settings=FAST, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(MaybeApplied) as info:
            client.learn("s")
    assert len(seen) == 1
    assert isinstance(info.value, AmbiguousEffect)
    assert info.value.attempts == 1 and info.value.last_cause
    assert "1 attempt(s)" in str(info.value) and URL in str(info.value)  # the message a person reads


@pytest.mark.parametrize("failure", [httpx.ReadTimeout("timed out"), httpx.Response(500, text="oops"),
                                     httpx.Response(502, text="bad gateway")],
                         ids=["read-timeout", "500", "502"])
def test_keyed_calls_and_reads_are_resent_after_an_ambiguous_failure(failure: Any) -> None:
    """With an Idempotency-Key (or for a read) the same request is simply sent again."""
    handler, seen = scripted([failure, LEARNED])
    with KatoClient(URL, settings=FAST, transport=httpx.MockTransport(handler)) as client:
        client.learn("s", idempotency_key="k-1")
    assert [r.headers["Idempotency-Key"] for r in seen] == ["k-1", "k-1"]
    stm = httpx.Response(200, json={"stm": [["a"]], "session_id": "s", "length": 1})
    handler, seen = scripted([failure, stm])
    with KatoClient(URL, settings=FAST, transport=httpx.MockTransport(handler)) as client:
        assert client.stm("s") == [["a"]]
    assert len(seen) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422, 501, 505, 507])
def test_client_errors_are_never_retried(status: int) -> None:
    """4xx are answers about the request, and 501/505/507 faults a resend will not fix: one attempt, then
    ProtocolError with the status and the answer's reason."""
    handler, seen = scripted([httpx.Response(status, json={"detail": "no: the reason"})])
    with KatoClient(URL, settings=FAST, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ProtocolError, match=str(status)) as info:
            client.stm("s")
        assert info.value.status_code == status and info.value.error_code is None
        assert "no: the reason" in str(info.value)
    assert len(seen) == 1


def test_session_not_found_is_its_own_error() -> None:
    """KATO's 404 SESSION_NOT_FOUND body becomes SessionNotFound (a SessionLost) naming the session."""
    handler, _ = scripted([not_found("s-1")])
    with KatoClient(URL, settings=FAST, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(SessionNotFound) as info:
            client.learn("s-1")
    assert isinstance(info.value, SessionLost) and info.value.session_id == "s-1"


def test_a_404_of_the_session_route_itself_is_a_lost_session() -> None:
    """GET/DELETE /sessions/{id} answer KATO's FastAPI body (no error code): the route is the session, so 404 is
    SessionNotFound; a 404 without the code on a sub-route is not (a ProtocolError with the status)."""
    plain = httpx.Response(404, json={"detail": "Session s-1 not found or expired"})
    handler, _ = scripted([plain, plain, plain])
    with KatoClient(URL, settings=FAST, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(SessionNotFound) as info:
            client.get_session("s-1")
        assert info.value.session_id == "s-1"
        assert client.delete_session("s-1") is False
        with pytest.raises(ProtocolError) as other:
            client.learn("s-1")
        assert not isinstance(other.value, SessionLost) and other.value.status_code == 404


def test_retry_after_is_honoured() -> None:
    """The wait after a 429/503 is at least its Retry-After (recorded instead of slept)."""
    slept: list[float] = []
    handler, seen = scripted([httpx.Response(429, headers={"Retry-After": "2"}),
                              httpx.Response(503, headers={"Retry-After": "1.5"}), LEARNED])
    outage = OutageTracker(FAST.outage_seconds, sleep=slept.append)
    with KatoClient(URL, settings=FAST, transport=httpx.MockTransport(handler), outage=outage) as client:
        client.learn("s")
    assert len(seen) == 3
    assert slept[0] >= 2.0 and slept[1] >= 1.5
    assert all(s <= FAST.outage_seconds for s in slept)


def test_retry_after_http_date() -> None:
    """Retry-After may be an HTTP date; a garbage value is ignored."""
    from datetime import datetime, timezone

    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:03 GMT", now=lambda: now) == pytest.approx(3.0)
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-4") == 0.0


def test_attempts_are_capped_and_the_error_says_what_happened() -> None:
    """After retry_max_attempts connect errors (when set): ServerUnavailable naming server, call, attempts, time,
    cause."""
    handler, seen = scripted([httpx.ConnectError("Connection refused")])
    settings = FAST.model_copy(update={"retry_max_attempts": 3})
    with KatoClient(URL, settings=settings, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ServerUnavailable) as info:
            client.health()
    assert len(seen) == 3
    assert info.value.attempts == 3 and "Connection refused" in (info.value.last_cause or "")
    msg = str(info.value)
    assert URL in msg and "GET /health" in msg and "3 attempt(s)" in msg and "Connection refused" in msg
    assert re.search(r"in \d+\.\d s", msg) and "retry_max_attempts (3)" in msg
    assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_total_time_is_capped() -> None:
    """A call that keeps failing stops once the outage has lasted outage_seconds: its last wait is cut to what is
    left, so it sends its last attempt exactly at the budget (a clock that moves only when the client waits)."""
    now = [0.0]
    settings = ClientConfig(outage_seconds=60, backoff_initial=0.5, backoff_max=4.0)
    outage = OutageTracker(settings.outage_seconds, clock=lambda: now[0],
                           sleep=lambda s: now.__setitem__(0, now[0] + s))
    handler, seen = scripted([httpx.Response(503, text="busy")])
    with KatoClient(URL, settings=settings, transport=httpx.MockTransport(handler), outage=outage) as client:
        with pytest.raises(ServerUnavailable) as info:
            client.health()
    assert now[0] == pytest.approx(60.0)
    assert 15 <= len(seen) <= 22  # 0.5, 1, 2, then about 4 s apart: no attempt cap cuts it short
    assert "answering 503" in str(info.value) and "client.outage_seconds (60 s)" in str(info.value)


def test_malformed_answer_is_a_protocol_error() -> None:
    """A 200 whose body does not fit the model is a ProtocolError naming the model."""
    handler, _ = scripted([httpx.Response(200, json={"stm": "not a list"})])
    with KatoClient(URL, settings=FAST, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ProtocolError, match="StmResult"):
            client.stm("s")


def test_bad_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="http://"):
        KatoClient("localhost:8000")


def test_pattern_absent_is_none_and_present_is_typed() -> None:
    """GET /pattern's 200 status:"error" means absent (KATO never answers 404 there)."""
    kato = FakeKato()
    kato.kb[("n", pattern_hash(UNIT))] = 2
    kato.patterns[pattern_hash(UNIT)] = UNIT
    with kato.client() as client:
        assert client.pattern("n", "PTRN|" + "0" * 40) is None
        found = client.pattern("n", pattern_name(UNIT))
        assert found is not None and found.frequency == 2 and found.pattern_data == UNIT and found.kb_id == "n_kato"


def test_node_patterns_fetches_every_page() -> None:
    """node_patterns walks offset/limit pages until total."""
    rows = [{"name": f"p{i:03d}", "pattern_data": [["a"], [str(i)]], "frequency": i + 1} for i in range(7)]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/nodes":
            return httpx.Response(200, json={"nodes": [{"node_id": "n", "kb_id": "n_kato", "pattern_count": 7,
                                                        "total_frequency": 28}]})
        off, lim = int(request.url.params["offset"]), int(request.url.params["limit"])
        return httpx.Response(200, json={"node_id": "n", "kb_id": "n_kato", "total": 7, "offset": off, "limit": lim,
                                         "patterns": rows[off:off + lim]})

    with KatoClient(URL, settings=FAST, transport=httpx.MockTransport(handler)) as client:
        assert [p.name for p in client.node_patterns("n", page_size=3)] == [r["name"] for r in rows]
        kb = client.export_knowledge_base()
    assert kb == {"n": {f"PTRN|p{i:03d}": i + 1 for i in range(7)}}


# ---- config check ------------------------------------------------------------------------------


def test_silently_dropped_config_is_rejected_by_name() -> None:
    """A server that created the session with defaults instead of the asked config -> ConfigRejected."""
    kato = FakeKato(reject_config=True)
    with kato.client() as client:
        with pytest.raises(ConfigRejected) as info:
            client.create_session("n", {"max_pattern_length": 0, "process_predictions": False, "recall_threshold": 5})
    msg = str(info.value)
    assert "process_predictions" in msg and "recall_threshold" in msg and "max_pattern_length:" not in msg
    assert kato.sessions == {}  # the useless session was deleted


def test_accepted_config_passes() -> None:
    with FakeKato().client() as client:
        info = client.create_session("n", {"process_predictions": False, "recall_threshold": 0.1})
    assert info.session_config["process_predictions"] is False


def test_node_session_refuses_server_side_auto_learn() -> None:
    with FakeKato().client() as client, pytest.raises(ConfigError, match="max_pattern_length"):
        NodeSession(client, "n", {"max_pattern_length": 3})


def test_keys_mode_needs_a_server_with_idempotency() -> None:
    kato = FakeKato()
    with kato.client() as client, pytest.raises(ConfigError, match="verify"):
        node = NodeSession(client, "n", TRAIN_CONFIG, mode="keys")
        assert kato.log == []  # the constructor sends nothing; the first unit asks the server
        node.learn_unit(UNIT, "k")


def test_constructors_send_nothing() -> None:
    """KatoClient and NodeSession do no network I/O until the first call; then GET / is asked once."""
    kato = FakeKato(idempotency=True)
    with kato.client() as client:
        nodes = [NodeSession(client, f"n{i}", TRAIN_CONFIG) for i in range(3)]
        assert kato.log == []
        for node in nodes:
            node.learn_unit(UNIT, f"k-{node.node_id}")
            assert node.mode == "keys"
    assert kato.log.count("GET /") == 1


# ---- exactly once: verify mode decisions (mode="verify": two requests per unit) ------------------


def run_unit(kato: FakeKato, mode: str | None = None) -> tuple[str, list[tuple[str, str, int | None]]]:
    phases: list[tuple[str, str, int | None]] = []
    with kato.client() as client:
        node = NodeSession(client, "n", TRAIN_CONFIG, mode=mode)  # type: ignore[arg-type]
        name = node.learn_unit(UNIT, "key-1", on_phase=lambda p, sid, t: phases.append((p, sid, t)))
    return name, phases


def test_verify_mode_happy_path_calls_phases_before_requests() -> None:
    kato = FakeKato()
    name, phases = run_unit(kato, "verify")
    assert name == pattern_name(UNIT) and kato.freq("n", UNIT) == 1
    assert [p for p, *_ in phases] == ["observe", "learn"]
    assert kato.log[-2:] == ["POST /sessions/session-1/observe-sequence", "POST /sessions/session-1/learn"]


@pytest.mark.parametrize("action", ["lost", "unsent"])
def test_lost_learn_answer_is_decided_from_the_stm(action: str) -> None:
    """Applied (STM empty) -> not resent; not applied (STM == unit) -> resent. Either way frequency 1."""
    kato = FakeKato()
    kato.faults = [("POST", "/learn", action)]
    name, phases = run_unit(kato, "verify")
    assert name == pattern_name(UNIT) and kato.freq("n", UNIT) == 1
    assert kato.log.count("GET /sessions/session-1/stm") == 1
    assert kato.log.count("POST /sessions/session-1/learn") == (1 if action == "lost" else 2)


@pytest.mark.parametrize("action", ["lost", "unsent"])
def test_lost_observe_answer_is_repaired_by_clear_and_resend(action: str) -> None:
    kato = FakeKato()
    kato.faults = [("POST", "/observe-sequence", action)]
    name, _ = run_unit(kato, "verify")
    assert name == pattern_name(UNIT) and kato.freq("n", UNIT) == 1
    assert kato.log.count("POST /sessions/session-1/clear-stm") == 1


def test_expired_session_is_replaced_and_the_unit_redone_from_a_clean_stm() -> None:
    """404 on the learn proves it was not applied: new session, whole unit again, frequency 1."""
    kato = FakeKato()
    kato.faults = [("POST", "/learn", "expire")]
    name, phases = run_unit(kato, "verify")
    assert name == pattern_name(UNIT) and kato.freq("n", UNIT) == 1
    assert [sid for _, sid, _ in phases] == ["session-1", "session-1", "session-2", "session-2"]


def test_lost_learn_then_vanished_session_with_absent_pattern_redoes_the_unit() -> None:
    kato = FakeKato()
    kato.faults = [("POST", "/learn", "unsent"), ("GET", "/stm", "expire")]
    name, _ = run_unit(kato, "verify")
    assert name == pattern_name(UNIT) and kato.freq("n", UNIT) == 1


def test_lost_learn_then_vanished_session_with_present_pattern_is_ambiguous() -> None:
    """Honest limit: the pattern exists, so whether THIS learn added to it cannot be decided."""
    kato = FakeKato()
    kato.faults = [("POST", "/learn", "lost_and_expire")]
    with pytest.raises(AmbiguousEffect, match="cannot be decided"):
        run_unit(kato, "verify")
    assert kato.freq("n", UNIT) == 1  # it was applied once; nothing was resent


def test_session_lost_over_and_over_gives_up() -> None:
    kato = FakeKato()
    kato.faults = [("POST", "/observe-sequence", "expire")] * 10
    with pytest.raises(SessionLost, match="vanished"):
        run_unit(kato, "verify")


def test_wrong_learned_name_is_a_protocol_error() -> None:
    """Something else in the STM (another client on the session) is detected by the name check."""
    kato = FakeKato()
    with kato.client() as client:
        node = NodeSession(client, "n", TRAIN_CONFIG, mode="verify")
        node.learn_unit(UNIT, "k0")
        kato.sessions[node.session_id]["stm"].append(["intruder"])  # appears after the unit's start
        with pytest.raises(ProtocolError, match="learned"):
            node.learn_unit(UNIT, "k1")


def test_unit_took_effect_after_a_trainer_crash() -> None:
    kato = FakeKato()
    with kato.client() as client:
        sid = client.create_session("n", TRAIN_CONFIG).session_id
        assert unit_took_effect(client, "n", sid, UNIT, "observe") is False
        client.observe_sequence(sid, UNIT)
        assert unit_took_effect(client, "n", sid, UNIT, "learn") is False
        client.learn(sid)
        assert unit_took_effect(client, "n", sid, UNIT, "learn") is True
        client.delete_session(sid)
        with pytest.raises(AmbiguousEffect):
            unit_took_effect(client, "n", sid, UNIT, "learn")
        assert unit_took_effect(client, "other-node", sid, UNIT, "learn") is False
        with pytest.raises(ValueError, match="keyed"):
            unit_took_effect(client, "n", sid, UNIT, "keyed")
        with pytest.raises(ValueError, match="counter"):
            unit_took_effect(client, "n", sid, UNIT, "counted")  # a counted phase needs its counter


# ---- exactly once: counter mode decisions (the default without keys: one request per unit) ----------


N = len(UNIT)


def test_counter_mode_is_the_default_without_keys_and_sends_one_request_per_unit() -> None:
    """The counter is read once per session; then each unit is one observe-sequence with learn_at_end, journaled
    ("counted") with the counter before it."""
    kato = FakeKato()
    phases: list[tuple[str, str, int | None]] = []
    with kato.client() as client:
        node = NodeSession(client, "n", TRAIN_CONFIG)
        for i in range(3):
            node.learn_unit(UNIT, f"k{i}", on_phase=lambda p, sid, t: phases.append((p, sid, t)))
        assert node.mode == "counter"
    assert kato.freq("n", UNIT) == 3
    assert phases == [("counted", "session-1", 0), ("counted", "session-1", N), ("counted", "session-1", 2 * N)]
    assert kato.log[1:] == ["POST /sessions", "GET /sessions/session-1/cognition-data"] + \
        ["POST /sessions/session-1/observe-sequence"] * 3


@pytest.mark.parametrize(("action", "sequences"), [("lost", 1), ("unsent", 2)])
def test_lost_sequence_answer_is_decided_by_the_counter(action: str, sequences: int) -> None:
    """Counter advanced by the unit with an empty STM: learned, not resent. Counter unchanged: resent. Frequency 1."""
    kato = FakeKato()
    kato.faults = [("POST", "/observe-sequence", action)]
    name, phases = run_unit(kato)
    assert name == pattern_name(UNIT) and kato.freq("n", UNIT) == 1
    assert kato.log.count("POST /sessions/session-1/observe-sequence") == sequences
    assert kato.log.count("GET /sessions/session-1/cognition-data") == 2  # the first read, then the decision
    assert [p for p, *_ in phases] == ["counted"] * sequences


@pytest.mark.parametrize("action", ["swallow", "lost_swallow"])
def test_a_failed_final_learn_is_learned_once(action: str) -> None:
    """KATO swallows a failed final learn: the events stay in the STM (seen in the answer, or through the counter
    and the STM when the answer is lost). The client sends learn, journaled as a "learn" phase."""
    kato = FakeKato()
    kato.faults = [("POST", "/observe-sequence", action)]
    name, phases = run_unit(kato)
    assert name == pattern_name(UNIT) and kato.freq("n", UNIT) == 1
    assert [p for p, *_ in phases] == ["counted", "learn"]
    assert kato.log.count("POST /sessions/session-1/learn") == 1


def test_lost_sequence_then_vanished_session() -> None:
    """Pattern absent after the session vanished: the unit is redone in a new session; present: ambiguous."""
    kato = FakeKato()
    kato.faults = [("POST", "/observe-sequence", "unsent"), ("GET", "/cognition-data", "expire")]
    kato.faults.insert(0, ("GET", "/cognition-data", "none"))  # the first read (new session) passes
    name, phases = run_unit(kato)
    assert name == pattern_name(UNIT) and kato.freq("n", UNIT) == 1
    assert [sid for _, sid, _ in phases] == ["session-1", "session-2"]
    kato = FakeKato()
    kato.faults = [("POST", "/observe-sequence", "lost_and_expire")]
    with pytest.raises(AmbiguousEffect, match="cannot be decided"):
        run_unit(kato)
    assert kato.freq("n", UNIT) == 1


def test_an_intruder_in_the_stm_is_a_protocol_error_before_anything_is_learned_twice() -> None:
    kato = FakeKato()
    with kato.client() as client:
        node = NodeSession(client, "n", TRAIN_CONFIG)
        node.learn_unit(UNIT, "k0")
        kato.sessions[node.session_id]["stm"].append(["intruder"])
        with pytest.raises(ProtocolError, match="initial STM 1"):
            node.learn_unit(UNIT, "k1")


def test_unit_took_effect_with_the_journaled_counter() -> None:
    """After a trainer crash: unchanged counter -> False; advanced, STM empty -> True; advanced with the unit still in
    the STM (final learn failed) -> False (the unit is redone elsewhere); vanished session -> the pattern decides."""
    kato = FakeKato()
    with kato.client() as client:
        sid = client.create_session("n", TRAIN_CONFIG).session_id
        assert unit_took_effect(client, "n", sid, UNIT, "counted", 0) is False
        client.observe_sequence(sid, UNIT, learn_at_end=True)
        assert unit_took_effect(client, "n", sid, UNIT, "counted", 0) is True
        kato.swallow = True
        kato.faults = [("POST", "/observe-sequence", "swallow")]
        client.observe_sequence(sid, UNIT, learn_at_end=True)
        assert unit_took_effect(client, "n", sid, UNIT, "counted", N) is False
        with pytest.raises(ProtocolError, match="counter 8"):
            unit_took_effect(client, "n", sid, UNIT, "counted", 1)  # neither before nor after this unit
        client.delete_session(sid)
        with pytest.raises(AmbiguousEffect):
            unit_took_effect(client, "n", sid, UNIT, "counted", N)
        assert unit_took_effect(client, "other-node", sid, UNIT, "counted", N) is False


# ---- exactly once: keys mode -------------------------------------------------------------------


def test_keys_mode_is_one_keyed_request_and_survives_a_lost_answer() -> None:
    kato = FakeKato(idempotency=True)
    kato.faults = [("POST", "/observe-sequence", "lost")]
    name, phases = run_unit(kato)
    assert name == pattern_name(UNIT) and kato.freq("n", UNIT) == 1
    assert [p for p, *_ in phases] == ["keyed"]
    assert kato.log.count("POST /sessions/session-1/observe-sequence") == 2


def test_keys_mode_key_applied_under_another_session_counts_as_learned() -> None:
    """A resumed trainer resends the unit to a new session: the key conflict proves it was applied."""
    kato = FakeKato(idempotency=True)
    with kato.client() as client:
        NodeSession(client, "n", TRAIN_CONFIG).learn_unit(UNIT, "key-1")
        again = NodeSession(client, "n", TRAIN_CONFIG)
        assert again.learn_unit(UNIT, "key-1") == pattern_name(UNIT)
        assert kato.freq("n", UNIT) == 1
        kato.kb.clear()  # a conflict whose pattern is missing is a contradiction
        with pytest.raises(ProtocolError, match="recorded as applied"):
            NodeSession(client, "n", TRAIN_CONFIG).learn_unit(UNIT, "key-1")


def test_key_conflict_is_recognised_by_its_error_code() -> None:
    """A 422 with the code IDEMPOTENCY_KEY_REUSED is KeyAlreadyUsed; another 422 (validation) is a plain ProtocolError."""
    detail = "Idempotency-Key 'k' was already used for a different request"
    handler, _ = scripted([httpx.Response(422, json={"detail": detail, "error": {"code": "IDEMPOTENCY_KEY_REUSED",
                                                                                "message": detail}}),
                           httpx.Response(422, json={"detail": [{"loc": ["body"], "msg": detail}]})])
    with KatoClient(URL, settings=FAST, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(KeyAlreadyUsed) as info:
            client.learn("s", idempotency_key="k")
        assert info.value.key == "k" and info.value.status_code == 422
        with pytest.raises(ProtocolError) as other:
            client.learn("s", idempotency_key="k")
        assert not isinstance(other.value, KeyAlreadyUsed) and other.value.status_code == 422


def test_token_is_sent_and_a_refusal_names_it() -> None:
    """The bearer token goes in Authorization; a 401 says to check it."""
    handler, seen = scripted([httpx.Response(401, json={"detail": "Missing or wrong bearer token"})])
    with KatoClient(URL, token="s3cret", settings=FAST, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ProtocolError, match="server_token"):
            client.nodes()
    assert seen[0].headers["Authorization"] == "Bearer s3cret"


# ---- outages: 500s ridden out within the budget, each decision still made from server state -----------------


def ticking(budget: float) -> tuple[OutageTracker, list[float]]:
    """A tracker on a clock that moves only when a client waits: outages of minutes in milliseconds."""
    now = [0.0]
    return OutageTracker(budget, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)), now


def test_a_500_outage_of_a_keyed_call_is_ridden_out_and_said_now_and_then(caplog: pytest.LogCaptureFixture) -> None:
    """A keyed call answered 500 for 45 s is resent until it succeeds; the log says so at once and every 30 s
    (counting down from the budget), not at each of its attempts, and once when the server answers again."""
    outage, now = ticking(900)
    handler, seen = scripted([lambda r: httpx.Response(500, text="oops") if now[0] < 45 else LEARNED])
    settings = ClientConfig(backoff_initial=0.5, backoff_max=4.0)
    with caplog.at_level("DEBUG", logger="streamtrain.client"), \
            KatoClient(URL, settings=settings, transport=httpx.MockTransport(handler), outage=outage) as client:
        assert client.learn("s", idempotency_key="k-1").pattern_name == "PTRN|x"
    assert len(seen) > 10 and {r.headers["Idempotency-Key"] for r in seen} == {"k-1"}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    lefts = [int(m) for w in warnings for m in re.findall(
        r"^server http://kato.test answering 500 since \d\d:\d\d:\d\d, retrying \((\d+) s left\)$", w)]
    assert len(lefts) == len(warnings) == 2 and 860 <= lefts[1] <= lefts[0] - 30 and lefts[0] < 900
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert len(infos) == 1 and re.search(r"answering again after 4\d\.\d s \(it was answering 500\)", infos[0])
    assert not outage.failing


@pytest.mark.parametrize(("actions", "sequences"), [(["500"] * 3 + ["applied_500"], 4), (["500"] * 5, 6)])
def test_counter_mode_decides_each_500_from_the_counter(actions: list[str], sequences: int) -> None:
    """A 500 on an unkeyed observe-sequence may have been applied: never resent blindly. The counter decides each:
    unchanged, so it is sent again after a wait; advanced by the unit (applied, then the 500), so it is learned.
    No attempt cap cuts the outage short (retry_max_attempts unset)."""
    kato = FakeKato()
    kato.faults = [("POST", "/observe-sequence", a) for a in actions]
    outage, now = ticking(900)
    with kato.client(settings=ClientConfig(), outage=outage) as client:
        assert NodeSession(client, "n", TRAIN_CONFIG).learn_unit(UNIT, "k") == pattern_name(UNIT)
    assert kato.freq("n", UNIT) == 1
    assert kato.log.count("POST /sessions/session-1/observe-sequence") == sequences
    assert kato.log.count("GET /sessions/session-1/cognition-data") == 1 + len(actions)
    assert now[0] > 0  # it waited before each resend


@pytest.mark.parametrize("mode", ["counter", "verify"])
def test_past_the_budget_a_unit_stops_with_what_happened_and_what_to_do(mode: str) -> None:
    """Every observe-sequence answered 500: after the budget the unit stops, naming the cause, how long it lasted
    and what to do; also when other requests succeed in between (verify mode's clear-stm), never a loop forever."""
    kato = FakeKato()
    kato.faults = [("POST", "/observe-sequence", "500")] * 10_000
    outage, now = ticking(120)
    with kato.client(settings=ClientConfig(outage_seconds=120), outage=outage) as client:
        with pytest.raises(ServerUnavailable) as info:
            NodeSession(client, "n", TRAIN_CONFIG, mode=mode).learn_unit(UNIT, "k")  # type: ignore[arg-type]
    assert kato.freq("n", UNIT) == 0 and now[0] == pytest.approx(120, abs=6)
    msg = str(info.value)
    assert re.search(r"has been answering 500 since \d\d:\d\d:\d\d \(2 min 0 s\)", msg), msg
    assert "client.outage_seconds (120 s)" in msg and "run the same command again" in msg


@pytest.mark.parametrize("action", ["500", "applied_500"])
def test_verify_mode_decides_a_500_on_learn_from_the_stm(action: str) -> None:
    kato = FakeKato()
    kato.faults = [("POST", "/learn", action)]
    name, _ = run_unit(kato, "verify")
    assert name == pattern_name(UNIT) and kato.freq("n", UNIT) == 1
    assert kato.log.count("POST /sessions/session-1/learn") == (2 if action == "500" else 1)
