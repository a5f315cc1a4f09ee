"""Start the embedded server as a subprocess on a free port, wait for /health, stop it.

The server runs in a session (and so a process group) of its own: a Ctrl-C in a terminal, ``kill -TERM -PGID`` or a
notebook's stop button signals the whole foreground group, and must reach the process that started the server (which
checkpoints and then stops it), not the server under its feet. ``--exit-with-parent`` still ends a server whose
starter was killed.
"""

from __future__ import annotations

import http.client
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

from streamtrain.disk import describe_disk, disk_error, is_storage_error
from streamtrain.errors import ServerUnavailable
from streamtrain.server.defaults import EXIT_STORAGE, TOKEN_ENV

log = logging.getLogger(__name__)


# URL -> bearer token of each server this process started with a token and has not stopped. In memory only: a
# client of this process (the trainer, a notebook's analysis connection) finds its own server's token here.
_tokens: dict[str, str] = {}


def token_for(url: str) -> str | None:
    """The bearer token of a running EmbeddedServer started by this process at ``url``, else None."""
    return _tokens.get(url.rstrip("/"))


def describe_exit(code: int) -> str:
    """A process's end as a person reads it: "exit code 2", or "killed by signal SIGKILL" (Popen's negative codes)."""
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


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
        self.token = token          # handed to the child in its environment, never on its command line
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

    @property
    def process(self) -> subprocess.Popen | None:
        """The child started last (running or exited), None before start() and after stop() or kill()."""
        return self._proc

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "streamtrain.server", "--host", self.host, "--port", str(self.port),
               "--db", str(self.db_path), "--log-level", "warning", "--exit-with-parent", str(os.getpid()),
               # the server a killed trainer left on this database stops itself within a second: wait for it
               "--wait-for-db", "10"]
        # The token is never on the command line (any local user can read it with `ps`): see environment().
        if not self.idempotency:
            cmd.append("--no-idempotency")
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        """The child's environment: ours, with the bearer token in TOKEN_ENV (only the process itself and root can
        read another process's environment), or without that variable when this server has no token."""
        env = dict(os.environ)
        env.pop(TOKEN_ENV, None)
        if self.token:
            env[TOKEN_ENV] = self.token
        return env

    def log_tail(self, n: int = 30) -> str:
        """The last ``n`` lines of the server's log."""
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:]) or "(empty log)"

    def start(self) -> EmbeddedServer:
        if self.pid is not None:
            return self
        try:
            logf = open(self.log_path, "ab")
        except OSError as exc:
            if is_storage_error(exc):
                raise disk_error(exc, self.log_path, "open the embedded server's log") from None
            raise
        with logf:
            self._proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=self.environment(),
                                          start_new_session=True)  # group signals are its starter's to answer
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self._proc.poll()
            if code == EXIT_STORAGE:  # its disk refused a write; on a full disk its log may hold nothing of it
                raise ServerUnavailable(
                    f"embedded server could not start: it cannot write its database {self.db_path} "
                    f"({describe_disk(self.db_path)}). Free space on that disk or make it writable, then run the "
                    f"same command again. Its log {self.log_path} ends with:\n{self.log_tail()}")
            if code is not None:
                raise ServerUnavailable(
                    f"embedded server exited ({describe_exit(code)}) during startup (db {self.db_path}, "
                    f"port {self.port}); log {self.log_path} ends with:\n{self.log_tail()}")
            if self._healthy():
                log.debug("embedded server up at %s (pid %s)", self.url, self._proc.pid)
                if self.token:
                    _tokens[self.url] = self.token
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise ServerUnavailable(
                    f"embedded server did not answer /health within {self.startup_timeout} s at {self.url}; "
                    f"log {self.log_path} ends with:\n{self.log_tail()}")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        """Whether GET /health answers 200 (http.client: the launcher loads no HTTP library of its own)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=2.0)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def stop(self, timeout: float = 10.0) -> None:
        _tokens.pop(self.url, None)
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
        _tokens.pop(self.url, None)
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:  # a forgotten server must not outlive its owner
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
        except Exception:
            pass
