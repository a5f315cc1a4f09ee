"""The wire contract (streamtrain/wire.py): what KatoClient sends is exactly what the server's request models
describe, and what the embedded server answers carries every field the client's answer models name.

The client drives the real app in-process (conftest's ``app_client``: the HTTP contract, no process behaviour) and
every exchange is recorded where httpx sends it. A field renamed, added or dropped on either side fails here.
Recorded answers of a real KATO 3.10.1 (tests/golden) must validate against the same models.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from budgets import FAST
from fastapi.testclient import TestClient
from pydantic import BaseModel

from streamtrain import limits, wire
from streamtrain.client import KatoClient
from streamtrain.errors import KeyAlreadyUsed
from streamtrain.hierarchy import Step
from streamtrain.patterns import pattern_name
from streamtrain.worker import batch_parts

GOLDEN = Path(__file__).resolve().parent / "golden" / "kato-golden.json"

# Fields of an answer model the embedded server need not send, and why.
NOT_SENT = {
    "PatternInfo.kb_id": "the client sets it from the answer's node_id",
    "PatternLookup.message": "only in a not-found answer",
    "PatternLookup.pattern": "only in a found answer",
}


@dataclass(frozen=True)
class Exchange:
    method: str
    path: str
    body: bytes
    status: int
    answer: bytes


def record(http: httpx.Client) -> list[Exchange]:
    """Every exchange ``http`` makes from now on, as sent and as answered."""
    seen: list[Exchange] = []

    def on_response(response: httpx.Response) -> None:
        response.read()
        request = response.request
        seen.append(Exchange(request.method, request.url.path, request.content, response.status_code,
                             response.content))

    http.event_hooks["response"].append(on_response)
    return seen


def endpoint(method: str, path: str) -> wire.Endpoint:
    """The entry of wire.ENDPOINTS for a request (a route missing from the table fails the test)."""
    for e in wire.ENDPOINTS:
        if e.method == method and re.fullmatch(re.sub(r"\{\w+\}", "[^/]+", e.path), path):
            return e
    raise AssertionError(f"{method} {path} is not in wire.ENDPOINTS")


def exactly(model: type[BaseModel], raw: bytes) -> None:
    """``raw`` validates as ``model`` and says nothing more: no field the model ignores, none coerced."""
    sent = json.loads(raw)
    parsed = model.model_validate_json(raw).model_dump(mode="json", exclude_unset=True)
    assert parsed == sent, f"{model.__name__}: sent {sent}, the server reads {parsed}"


def unsent(answer: BaseModel) -> set[str]:
    """The fields of ``answer``'s model (and of the models inside it) the answer did not carry."""
    missing = {f"{type(answer).__name__}.{name}" for name in type(answer).model_fields
               if name not in answer.model_fields_set}
    for name in answer.model_fields_set:
        value = getattr(answer, name)
        for inner in value if isinstance(value, list) else [value]:
            if isinstance(inner, BaseModel):
                missing |= unsent(inner)
    return missing


def check(exchanges: list[Exchange]) -> set[tuple[str, str]]:
    """Each exchange against its route's models; the routes seen."""
    routes = set()
    for x in exchanges:
        e = endpoint(x.method, x.path)
        routes.add((e.method, e.path))
        if e.request is None:
            assert not x.body, f"{x.method} {x.path} sent a body"
        else:
            exactly(e.request, x.body)
        if 200 <= x.status < 300:
            missing = unsent(e.answer.model_validate_json(x.answer)) - NOT_SENT.keys()
            assert not missing, f"{x.method} {x.path}: the server did not send {sorted(missing)}: {x.answer!r}"
        elif x.answer.startswith(b"{"):
            wire.ErrorAnswer.model_validate_json(x.answer)
    return routes


@pytest.fixture()
def recorded(app_client: Callable[..., TestClient]) -> Iterator[tuple[KatoClient, list[Exchange]]]:
    http = app_client()
    with KatoClient(str(http.base_url), http=http, settings=FAST) as client:
        yield client, record(http)


UNIT = [["to"], ["be"], ["or"]]


def test_every_call_of_the_client_matches_the_servers_models(recorded: tuple[KatoClient, list[Exchange]]) -> None:
    """Every route in wire.ENDPOINTS, called the way KatoClient calls it: the bodies are exactly the request models,
    the answers carry every field of the answer models."""
    client, exchanges = recorded
    assert client.info().idempotency and client.health().status == "healthy"
    sid = client.create_session("c-L0", {"max_pattern_length": 0, "process_predictions": False}, ttl_seconds=600)
    client.get_session(sid.session_id)
    s = sid.session_id
    assert client.session_exists(s)
    client.extend_session(s, 900)
    client.update_config(s, {"recall_threshold": 0.2})
    assert client.get_config(s)["recall_threshold"] == 0.2
    client.observe(s, ["b", "a"], emotives={"joy": 0.5}, metadata={"source": "test"}, idempotency_key="k-obs")
    assert client.stm(s) == [["a", "b"]]
    client.learn(s)
    client.observe_sequence(s, [["x"], {"strings": ["y"], "unique_id": "u-1"}], learn_after_each=False,
                            learn_at_end=True, clear_stm_between=False, idempotency_key="k-seq")
    client.observe(s, ["x"])
    client.predictions(s)
    assert client.cognition(s)[1] == [["x"]]
    client.clear_stm(s)
    found = client.pattern("c-L0", pattern_name([["a", "b"]]))
    assert found is not None and found.frequency == 1
    assert client.pattern("c-L0", "PTRN|" + "0" * 40) is None
    assert client.learn_batch([("c-L0", UNIT), ("c-L1", [["p"], ["q"]])], "k-batch") == [
        pattern_name(UNIT), pattern_name([["p"], ["q"]])]
    batches = [("b-1", [("c-L0", UNIT)]), ("b-2", [("c-L1", [["solo"]])])]
    assert client.learn_batches(batches) == client.learn_batches(batches) == [[pattern_name(UNIT)], [""]]  # replayed
    assert [n.node_id for n in client.nodes()] == ["c-L0", "c-L1"]
    assert client.node_stats("c-L0").pattern_count == 3
    assert len(list(client.node_patterns("c-L0", page_size=2))) == 3
    client.clear_all(s)
    assert client.delete_session(s)

    assert check(exchanges) == {(e.method, e.path) for e in wire.ENDPOINTS}


def test_the_docstrings_learn_batches_example_is_what_the_server_answers(
        recorded: tuple[KatoClient, list[Exchange]]) -> None:
    """wire.py's docstring shows a learn-batches request and its answer: sent as it stands (its second sample
    sent once before), the server answers exactly what it shows."""
    client, exchanges = recorded
    doc = wire.__doc__ or ""
    request = json.loads(re.search(r"POST /learn-batches\n(.*?)\n\n", doc, re.S).group(1))  # type: ignore[union-attr]
    answer = json.loads(re.search(r"\n    200 (.*?)\n\n", doc, re.S).group(1))  # type: ignore[union-attr]
    earlier = request["batches"][1]
    assert client.learn_batches([(earlier["key"], [(i["node_id"], i["events"]) for i in earlier["items"]])])
    batches = [(b["key"], [(i["node_id"], i["events"]) for i in b["items"]]) for b in request["batches"]]
    client.learn_batches(batches)
    assert json.loads(exchanges[-1].body) == request
    assert json.loads(exchanges[-1].answer) == answer
    check(exchanges)


def test_a_reused_key_is_one_condition_with_one_code(recorded: tuple[KatoClient, list[Exchange]]) -> None:
    """An Idempotency-Key and a learn-batches key applied before to something else: both 422 with the code
    IDEMPOTENCY_KEY_REUSED naming the key, both KeyAlreadyUsed for the client."""
    client, exchanges = recorded
    client.learn_batch([("r-L0", UNIT)], "k-1")
    client.learn_batches([("k-1", [("r-L0", UNIT)])])  # a batch key: apart from the Idempotency-Key "k-1"
    for reuse in (lambda: client.learn_batch([("r-L0", [["other"], ["unit"]])], "k-1"),
                  lambda: client.learn_batches([("k-1", [("r-L0", [["other"], ["unit"]])])])):
        with pytest.raises(KeyAlreadyUsed) as refused:
            reuse()
        assert refused.value.key == "k-1" and refused.value.status_code == 422
        error = wire.ErrorAnswer.model_validate_json(exchanges[-1].answer).error
        assert error is not None and (error.code, error.key) == (wire.IDEMPOTENCY_KEY_REUSED, "k-1")
    check(exchanges)


def test_the_old_code_of_a_reused_batch_key_is_still_understood() -> None:
    """An embedded server of an older streamtrain answered a reused learn-batches key with KEY_REUSED."""
    old = httpx.Response(422, json={"detail": "Batch key 'k-9' was already used ...",
                                    "error": {"code": "KEY_REUSED", "key": "k-9"}})
    with KatoClient("http://old", transport=httpx.MockTransport(lambda request: old), settings=FAST) as client:
        with pytest.raises(KeyAlreadyUsed) as refused:
            client.learn_batches([("k-9", [("n", UNIT)])])
    assert refused.value.key == "k-9" and refused.value.error_code == wire.IDEMPOTENCY_KEY_REUSED


def test_a_keyed_body_is_the_same_bytes_as_ever() -> None:
    """A run resumed after an upgrade resends its keyed requests in doubt; the server fingerprints their bytes, so the
    encoding of a body never changes (a NaN goes as null, which the server refuses, not as NaN)."""
    sequence = wire.observation_sequence_body([["to"], ("b", "é")], learn_after_each=False, learn_at_end=True,
                                              clear_stm_between=False)
    assert wire.encode(sequence) == ('{"observations":[{"strings":["to"]},{"strings":["b","é"]}],'
                                     '"learn_after_each":false,"learn_at_end":true,"clear_stm_between":false}').encode()
    assert wire.encode(wire.learn_batch_body([("n-L0", (("a",), ["b", "c"]))])) == \
        b'{"items":[{"node_id":"n-L0","events":[["a"],["b","c"]]}]}'
    assert wire.encode(wire.observation_body(["a"], {"joy": float("nan")}, None)) == \
        b'{"strings":["a"],"emotives":{"joy":null}}'


def test_the_trainers_biggest_requests_fit_a_default_server(app_client: Callable[..., TestClient]) -> None:
    """The trainer cuts a sample into parts within limits.TRAINER_MAX_ITEMS and TRAINER_MAX_BYTES (estimated); each
    part, as the body it really is, is accepted by a server with the default limits (many small steps, few big)."""
    http = app_client()
    wide = "w" * 2000
    for steps in ([Step(i, 0, [[f"t{i}"], [f"u{i}"]], "") for i in range(2500)],
                  [Step(i, 0, [[f"{wide}{i}-{j}"] for j in range(40)], "") for i in range(60)]):
        parts = batch_parts(steps)
        assert len(parts) > 1
        for n, (a, b) in enumerate(parts):
            body = wire.encode(wire.learn_batches_body([(f"part-{len(steps)}-{n}", [("big", s.events)
                                                                                     for s in steps[a:b]])]))
            assert b - a <= limits.TRAINER_MAX_ITEMS <= limits.LEARN_BATCH_PART <= limits.DEFAULT_MAX_BATCH_ITEMS
            assert len(body) <= limits.DEFAULT_MAX_BODY_BYTES
            answer = http.post("/learn-batches", content=body, headers={"Content-Type": "application/json"})
            assert answer.status_code == 200, answer.text[:300]


def golden_exchanges() -> Iterator[tuple[str, dict[str, Any]]]:
    for case in json.loads(GOLDEN.read_text())["cases"]:
        for step in case["steps"]:
            yield case["id"], step


def test_what_a_real_kato_answers_validates() -> None:
    """Every 2xx answer recorded from a real KATO 3.10.1 on a route the client calls validates against the client's
    answer model, and every request body it accepted against the request model."""
    checked = set()
    for case, step in golden_exchanges():
        path = step["path"].split("?")[0]
        if not 200 <= step["status"] < 300 or not any(re.fullmatch(re.sub(r"\{\w+\}", "[^/]+", e.path), path)
                                                       and e.method == step["method"] for e in wire.ENDPOINTS):
            continue
        e = endpoint(step["method"], path)
        assert e.kato, f"{case}: a real KATO answered an extension route {e.path}"
        e.answer.model_validate(step["response"])
        if e.request is not None and step.get("request") is not None:
            e.request.model_validate(step["request"])
        checked.add((e.method, e.path))
    # every KATO route the client calls but GET / and /health, which the golden set does not record
    assert checked == {(e.method, e.path) for e in wire.ENDPOINTS if e.kato} - {("GET", "/"), ("GET", "/health")}
