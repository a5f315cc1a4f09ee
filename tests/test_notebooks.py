"""The notebooks' bad-input path: an unreachable server_url stops a notebook at its connection cell with one
readable message; and the external-server path. (The normal path runs under `pytest --nbmake notebooks`.)"""

from __future__ import annotations

import socket
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nobody listens once the socket is closed


@pytest.mark.parametrize("notebook", ["training.ipynb", "inspect.ipynb"])  # predict shares inspect's first cells
def test_unreachable_server_url_stops_at_the_connection_cell_with_one_message(notebook, tmp_path, monkeypatch):
    url = dead_url()
    monkeypatch.setenv("ST_SERVER_URL", url)  # the kernel inherits this environment
    monkeypatch.setenv("ST_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("ST_DATA_DIR", str(tmp_path / "data"))
    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    with pytest.raises(CellExecutionError):
        client.execute()
    failed = [c for c in nb.cells if c.cell_type == "code" and any(o.output_type == "error" for o in c.get("outputs", []))]
    assert len(failed) == 1
    cell = failed[0]
    assert "nb.connect(" in cell.source
    later = nb.cells[nb.cells.index(cell) + 1:]
    assert all(not c.get("outputs") for c in later if c.cell_type == "code")  # nothing ran after it
    error = next(o for o in cell.outputs if o.output_type == "error")
    assert error.ename == "ServerUnavailable"
    assert url in error.evalue and "streamtrain serve" in error.evalue
    # one message, not a traceback through the library: no frames, no file paths
    text = "\n".join(error.traceback)
    assert len(error.traceback) <= 2 and "File " not in text and "Traceback" not in text
    assert not (tmp_path / "data").exists()  # it stopped before building the corpus or training


def test_predict_notebook_on_an_external_server_url(server, tmp_path, monkeypatch):
    """ST_SERVER_URL set (conftest's session server; run 'external' is this test's alone): the notebook trains its
    tiny run on that server and reads predictions from it."""
    from streamtrain.client import KatoClient

    monkeypatch.setenv("ST_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("ST_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ST_RUN_NAME", "external")
    monkeypatch.setenv("ST_SERVER_URL", server.url)
    nb = nbformat.read(NOTEBOOKS / "predict.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    with KatoClient(server.url) as client:
        assert client.node_stats("external-L0").pattern_count > 0  # trained on this server
    assert not (tmp_path / "ckpt" / "external" / "kb.sqlite3").exists()  # no embedded server was started
