"""Trainer processes without the interpreter's start-up, for the tests that kill or signal a trainer many times.

`python train_zygote.py` imports train_child.py (the trainer, `datasets`...) once, then forks one process per run
on request; each child runs train_child's `run_as_main` exactly as `python train_child.py CONFIG.json` does. A
child starts training in ~0.4 s instead of ~3 s (2 s of them importing `datasets`); the crash and signal tests start
~10 trainers each.

A child is a real process like one that `subprocess` starts: SIGKILL, SIGINT and SIGTERM reach it the same way, its
stdout and stderr go to a log file, it ends with SystemExit (the interpreter's usual shutdown: atexit handlers,
threads joined), and its modules' state is that of a fresh import: the zygote only imports, never trains (and
`random` reseeds itself in a forked child). It inherits the environment and working directory the zygote started
with, not the test's at the time of the spawn.

Protocol, one JSON line each way on the zygote's stdin and stdout:
    {"op": "spawn", "argv": [...], "log": path}          -> {"pid": N}
    {"op": "wait", "pid": N, "timeout": seconds | null}  -> {"returncode": code | null}   (timeout 0: a poll)
As subprocess does, the zygote reaps a child only when asked: until its exit status is read, its pid stays its own
(a zombie), so a signal sent to it never reaches another process. On end of input it SIGKILLs and reaps the
children it has left, then exits.

In the tests: `Zygote` starts one (conftest's session fixture `trainer_processes`) and its `spawn` returns a
`ForkedProcess`, which has the part of Popen's interface the tests use (pid, poll, wait, send_signal, kill).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent


# -- the zygote process ----------------------------------------------------------------------------------------


def _serve() -> dict[str, Any] | None:
    """Answer requests until end of input (returns None) or, in a freshly forked child, return its spawn request."""
    children: set[int] = set()
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        request = json.loads(line)
        if request["op"] == "spawn":
            pid = os.fork()
            if pid == 0:
                return request
            children.add(pid)
            reply: dict[str, Any] = {"pid": pid}
        elif request["op"] == "wait":
            pid, timeout = request["pid"], request["timeout"]
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                done, status = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
                if done:
                    children.discard(pid)
                    reply = {"returncode": os.waitstatus_to_exitcode(status)}
                    break
                if time.monotonic() >= deadline:  # type: ignore[operator]
                    reply = {"returncode": None}
                    break
                time.sleep(0.002)
        else:
            raise ValueError(f"unknown request {request!r}")
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    for pid in children:  # the tests' session is over: leave nothing running
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    return None


def _zygote_main() -> None:
    sys.path.insert(0, str(HERE))
    import datasets  # noqa: F401  (what the trainer imports on opening a dataset: most of a child's start-up)
    import httpcore  # noqa: F401
    import train_child

    sys.stdout.write(json.dumps({"ready": os.getpid()}) + "\n")
    sys.stdout.flush()
    request = _serve()
    if request is None:
        return
    # the child: stdin from /dev/null, stdout and stderr appended to the log, as Popen(stdout=log, stderr=STDOUT)
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    sys.argv = list(request["argv"])
    train_child.run_as_main()


# -- the tests' side -------------------------------------------------------------------------------------------


class ForkedProcess:
    """A child of the zygote, used like a subprocess.Popen."""

    def __init__(self, zygote: Zygote, pid: int, argv: list[str]) -> None:
        self.zygote, self.pid, self.args = zygote, pid, argv
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.zygote.request(op="wait", pid=self.pid, timeout=timeout)["returncode"]
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # not reaped yet: the pid is still this process's (maybe a zombie's)
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """Starts `python train_zygote.py` and talks to it; `spawn(argv, log)` forks `python train_child.py ...`."""

    def __init__(self, stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self._lock = threading.Lock()
        with open(stderr_path, "ab") as err:
            self._proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=err, text=True)
        self._read()  # {"ready": pid} once it has imported everything

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the trainer zygote died: {self.stderr_path.read_text()[-3000:]}")
        return json.loads(line)

    def request(self, **request: Any) -> dict[str, Any]:
        with self._lock:
            stdin: IO[str] = self._proc.stdin  # type: ignore[assignment]
            stdin.write(json.dumps(request) + "\n")
            stdin.flush()
            return self._read()

    def spawn(self, argv: list[str], log: Path) -> ForkedProcess:
        """Like Popen(argv, stdout=open(log, "ab"), stderr=STDOUT), for argv = [python, train_child.py, ...]."""
        assert Path(argv[1]).name == "train_child.py", argv
        pid = self.request(op="spawn", argv=[str(a) for a in argv[1:]], log=str(log))["pid"]
        return ForkedProcess(self, pid, [str(a) for a in argv])

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(timeout=60)


if __name__ == "__main__":
    _zygote_main()
