"""Replay every recorded real-KATO 3.10.1 exchange (tests/golden) against the embedded server
in-process (create_app through TestClient: the HTTP contract, no process behaviour). Every case must pass, except the deliberate deviations listed in
streamtrain/server/deviations.py, which must fail exactly where and how the table says.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from streamtrain.server import create_app
from streamtrain.server.deviations import DEVIATIONS

HERE = Path(__file__).resolve().parent
VENDORED_GOLDEN = HERE / "golden"


def _golden_dir() -> Path:
    """tests/golden (recorded fact, vendored: see its README), or STREAMTRAIN_GOLDEN_DIR to replay another set."""
    env = os.environ.get("STREAMTRAIN_GOLDEN_DIR")
    return Path(env) if env else VENDORED_GOLDEN


def _load_checker():
    """The checker beside the golden file, else the vendored copy (tests/golden/checker.py)."""
    path = _golden_dir() / "checker.py"
    if not path.is_file():
        path = VENDORED_GOLDEN / "checker.py"
    spec = importlib.util.spec_from_file_location("kato_golden_checker", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load_golden() -> dict | None:
    path = _golden_dir() / "kato-golden.json"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


GOLDEN = _load_golden()
CHECKER = _load_checker()
CASES = {c["id"]: c for c in GOLDEN["cases"]} if GOLDEN else {}


def test_golden_file_is_present():
    """A missing set fails this one test, never the collection of the whole suite."""
    assert GOLDEN is not None, (
        f"golden conformance file {_golden_dir() / 'kato-golden.json'} not found: it ships in tests/golden/; "
        "if STREAMTRAIN_GOLDEN_DIR is set, point it at a folder holding kato-golden.json")
    assert len(CASES) >= 60


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One app for every case, as one server answered them all before (each case names its own nodes)."""
    db = tmp_path_factory.mktemp("conformance") / "kb.sqlite3"
    with TestClient(create_app(db), base_url="http://embedded") as c:
        yield c


def _replay(client, case) -> str | None:
    ok, idx, diff = CHECKER.run_case(client, case, GOLDEN)
    if ok:
        return None
    step = case["steps"][idx]
    return f"step {idx} {step['method']} {step['path']}: {diff}"


def test_deviation_table_names_real_cases():
    unknown = sorted(set(DEVIATIONS) - set(CASES))
    assert not unknown, f"DEVIATIONS names case ids that are not in the golden file: {unknown}"
    for case_id, dev in DEVIATIONS.items():
        assert dev.reason and dev.failure, case_id


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_golden_case(client, case_id):
    failure = _replay(client, CASES[case_id])
    dev = DEVIATIONS.get(case_id)
    if dev is None:
        assert failure is None, f"{case_id} differs from real KATO 3.10.1: {failure}"
    else:
        assert failure is not None, f"{case_id} is listed as a deviation ({dev.reason}) but now passes"
        assert dev.failure in failure, (
            f"{case_id} fails, but not for the listed reason.\n  listed: {dev.failure}\n  actual: {failure}")
