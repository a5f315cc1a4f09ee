"""Start the embedded server as a subprocess on a free port, wait for /health, stop it."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from streamtrain.errors import ServerUnavailable

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedServer:
    """`python -m streamtrain.server` as a child process; the port is chosen once and kept across restart()."""

    def __init__(self, db_path: str | Path, *, host: str = "127.0.0.1", port: int | None = None,
                 idempotency: bool = True, token: str | None = None, extra_args: Sequence[str] = (),
                 startup_timeout: float = 30.0, log_path: str | Path | None = None) -> None:
        self.db_path = Path(db_path)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.idempotency = idempotency
        self.token = token
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self._own_log = log_path is None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="streamtrain-server-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen | None = None
        url_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{url_host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "streamtrain.server", "--host", self.host, "--port", str(self.port),
               "--db", str(self.db_path), "--log-level", "warning", "--exit-with-parent", str(os.getpid())]
        if self.token:
            cmd += ["--token", self.token]
        if not self.idempotency:
            cmd.append("--no-idempotency")
        return cmd + self.extra_args

    def _log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:]) or "(empty log)"

    def start(self) -> "EmbeddedServer":
        if self.pid is not None:
            return self
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise ServerUnavailable(
                        f"embedded server exited with code {code} during startup (db {self.db_path}, "
                        f"port {self.port}); log {self.log_path} ends with:\n{self._log_tail()}")
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        log.debug("embedded server up at %s (pid %s)", self.url, self._proc.pid)
                        return self
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise ServerUnavailable(
                        f"embedded server did not answer /health within {self.startup_timeout} s at {self.url}; "
                        f"log {self.log_path} ends with:\n{self._log_tail()}")
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("embedded server pid %s ignored SIGTERM for %s s; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait()
        if self._own_log:           # a temporary log of a cleanly stopped server is not worth keeping
            self.log_path.unlink(missing_ok=True)

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:  # a forgotten server must not outlive its owner
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
        except Exception:
            pass
