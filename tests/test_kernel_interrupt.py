"""The Jupyter stop button on a training cell, through a real kernel: jupyter_client's ``interrupt_kernel()`` sends
SIGINT to the kernel's whole process group (checked here with a sentinel process in that group, which the SIGINT
kills), as a notebook's stop button does. The training cell ends with reason 'interrupt', the server lives on, and
running the cell again resumes and ends with exactly the uninterrupted knowledge base.
"""

from __future__ import annotations

import json
import queue
import signal
import time
from pathlib import Path

import psutil
import pytest
from jupyter_client.manager import KernelManager
from runs import SAMPLES

from streamtrain.records.checkpoint import CheckpointStore
from streamtrain.server import EmbeddedServer

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def kernel():
    """A real IPython kernel (kernel spec ``python3``, this venv's interpreter) and its blocking client."""
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _finish(kc, msg_id: str, timeout: float = 120) -> tuple[str, str, str]:
    """(status, stdout, stderr) of the cell ``msg_id`` once the kernel is idle after it; an error's name and value
    follow its stdout."""
    out: list[str] = []
    err: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise queue.Empty
            msg = kc.get_iopub_msg(timeout=left)
        except queue.Empty:
            raise AssertionError(f"the cell did not finish within {timeout} s; its output: {''.join(out)}") from None
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            (out if content["name"] == "stdout" else err).append(content["text"])
        elif kind == "error":
            out.append(f"{content['ename']}: {content['evalue']}")
        elif kind == "status" and content["execution_state"] == "idle":
            break
    for _ in range(10):  # past earlier requests' replies (wait_for_ready's): a few at most
        reply = kc.get_shell_msg(timeout=10)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    else:
        raise AssertionError(f"no reply to the cell among the kernel's next 10 replies; its output: {''.join(out)}")
    return reply["content"]["status"], "".join(out), "".join(err)


def _run(kc, code: str) -> str:
    """Run a cell; its stdout (it must succeed)."""
    status, out, _ = _finish(kc, kc.execute(code))
    assert status == "ok", out
    return out


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _stop_button_mid_run(km, kc, cell: str, run_dir: Path, sentinel: int) -> str:
    """Run the training ``cell``, press the stop button once the run has checkpointed; the cell's stdout. Checks that
    the SIGINT went to the kernel's process group (the sentinel process in that group was killed by it) and that no
    server was hit (the trainer restarts its own server when it dies, and says so)."""
    msg_id = kc.execute(cell)
    deadline = time.monotonic() + 60
    while not CheckpointStore(run_dir).paths():
        assert time.monotonic() < deadline, "the training cell wrote no checkpoint"
        time.sleep(0.01)
    km.interrupt_kernel()
    status, out, err = _finish(kc, msg_id)
    assert status == "ok" and "exited unexpectedly" not in err, out + err
    died = _last_json(_run(kc, f"print(json.dumps({{'code': sentinels[{sentinel}].wait(timeout=30)}}))"))
    assert died["code"] == -signal.SIGINT, "interrupt_kernel() did not signal the kernel's process group"
    return out


SETUP = """
import json, os, signal, subprocess, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from runs import make_config
from streamtrain import analysis
from streamtrain import notebook as nb
from streamtrain.config import ClientConfig
from streamtrain.trainer import train
nb.setup()
sentinels = []

def sentinel():
    '''A process in this kernel's process group that a SIGINT kills (its default action, set explicitly).'''
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_DFL); time.sleep(600)"
    sentinels.append(subprocess.Popen([sys.executable, "-c", code]))
    return len(sentinels) - 1

client = ClientConfig(outage_seconds=30, read_timeout=10, learn_batch=False)  # a run of a few seconds
"""


def test_the_stop_button_on_a_cell_training_on_the_notebooks_server_then_the_cell_again(kernel, demo_corpus,
                                                                                           tmp_path, reference):
    """As training.ipynb does: ``nb.connect(None, kb_path)`` starts the embedded server, and the cell trains with
    ``server_url=conn.url``. The stop button does not reach that server: the cell ends 'interrupt', and the same
    cell again resumes on it and ends with the exact knowledge base."""
    km, kc = kernel
    _run(kc, SETUP.format(tests=str(TESTS)))
    info = _last_json(_run(kc, f"""
config = make_config(Path({str(tmp_path)!r}), Path({str(demo_corpus)!r}), "kernel-conn", None, client=client)
conn = nb.connect(None, nb.kb_path(config))
config = nb.with_changes(config, server_url=conn.url)
print(json.dumps({{"kernel": os.getpid(), "group": os.getpgid(0), "server": conn.server.pid,
                  "run_dir": str(config.run_dir), "sentinel": sentinel()}}))
"""))
    assert info["group"] == info["kernel"] and psutil.Process(info["server"]).ppid() == info["kernel"]
    cell = "result = train(config, progress=False)\nprint(result.reason, result.final_position)"
    out = _stop_button_mid_run(km, kc, cell, Path(info["run_dir"]), info["sentinel"])
    reason, position = out.split()[-2:]
    assert reason == "interrupt" and int(position) < SAMPLES, out
    assert psutil.Process(info["server"]).is_running()  # the notebook's server was not hit
    assert CheckpointStore(Path(info["run_dir"])).latest().reason == "interrupt"

    assert _run(kc, cell).split()[-2:] == ["end", str(SAMPLES)]
    kb = _last_json(_run(kc, "print(json.dumps(analysis.kb_by_level(conn.client, config)))\nconn.close()"))
    assert {int(level): names for level, names in kb.items()} == reference


def test_the_stop_button_on_a_cell_training_with_its_own_server_then_the_cell_again(kernel, demo_corpus, tmp_path,
                                                                                    reference):
    """Plain ``train(config)`` (the trainer's own embedded server): the stop button ends the cell with 'interrupt',
    the trainer stops its server, and the cell again resumes and ends with the exact knowledge base."""
    km, kc = kernel
    _run(kc, SETUP.format(tests=str(TESTS)))
    info = _last_json(_run(kc, f"""
config = make_config(Path({str(tmp_path)!r}), Path({str(demo_corpus)!r}), "kernel-own", None, client=client)
print(json.dumps({{"run_dir": str(config.run_dir), "sentinel": sentinel()}}))
"""))
    run_dir = Path(info["run_dir"])
    cell = "result = train(config, progress=False)\nprint(result.reason, result.final_position)"
    reason, position = _stop_button_mid_run(km, kc, cell, run_dir, info["sentinel"]).split()[-2:]
    assert reason == "interrupt" and int(position) < SAMPLES
    assert CheckpointStore(run_dir).latest().reason == "interrupt"

    assert _run(kc, cell).split()[-2:] == ["end", str(SAMPLES)]
    with EmbeddedServer(run_dir / "kb.sqlite3") as srv:
        from runs import kb_by_level

        kb = kb_by_level(srv.url, CheckpointStore(run_dir).latest().config)
    assert kb == reference
