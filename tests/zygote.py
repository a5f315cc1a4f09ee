"""Test scripts' processes without the interpreter's start-up, for the tests that kill or signal one many times.

`python zygote.py` imports what `python -m streamtrain train` and tests/checkpoint_writer.py import (the trainer,
`datasets`...) once, then forks one process per request; each child runs its script with `runpy.run_path(script,
run_name="__main__")`, as `python SCRIPT ARGS...` runs it, or the command (`python -m streamtrain ARGS...`) with
`runpy.run_module("streamtrain", run_name="__main__", alter_sys=True)`, as `-m` does. A child may start a session of
its own (`new_session`, as `Popen(start_new_session=True)`): it then leads its process group, as a shell's
foreground job does, and a signal sent to that group reaches exactly what a terminal's Ctrl-C would. A trainer starts training in ~0.4 s instead of ~3 s (2 s of
them importing `datasets`), a checkpoint writer writes at once instead of after ~0.5 s: the crash and signal tests
start 10-20 each.

A child is a real process like one that `subprocess` starts: SIGKILL, SIGINT and SIGTERM reach it the same way, its
stdout and stderr go to files, it ends through SystemExit or the end of its script (the interpreter's usual shutdown:
atexit handlers, threads joined), and its modules' state is that of a fresh import: the zygote only imports, never
runs the scripts' work (and `random` reseeds itself in a forked child). It inherits the environment and working
directory the zygote started with, not the test's at the time of the spawn.

Protocol, one JSON line each way on the zygote's stdin and stdout:
    {"op": "spawn", "argv": [script, ...] | ["-m", "streamtrain", ...], "stdout": path, "stderr": path,
     "fsize_limit": bytes | null, "new_session": bool}  -> {"pid": N}
    {"op": "wait", "pid": N, "timeout": seconds | null}  -> {"returncode": code | null}   (timeout 0: a poll)
As subprocess does, the zygote reaps a child only when asked: until its exit status is read, its pid stays its own
(a zombie), so a signal sent to it never reaches another process. On end of input it SIGKILLs and reaps the
children it has left, then exits.

In the tests: conftest's session fixture `zygote` starts one; `zygote.spawn([sys.executable, script, ...], stdout)`
returns a `ForkedProcess`, which has the part of Popen's interface the tests use (pid, poll, wait, send_signal, kill).
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
SCRIPTS = {"checkpoint_writer.py"}  # what the zygote has imported for; it forks only these
MODULES = {"streamtrain"}  # ... and `python -m` of these


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
    import runpy

    sys.path.insert(0, str(HERE))
    import checkpoint_writer  # noqa: F401
    import datasets  # noqa: F401  (what the trainer imports on opening a dataset: most of a trainer's start-up)
    import httpcore  # noqa: F401

    import streamtrain.cli
    import streamtrain.trainer  # noqa: F401

    sys.stdout.write(json.dumps({"ready": os.getpid()}) + "\n")
    sys.stdout.flush()
    request = _serve()
    if request is None:
        return
    if request.get("new_session"):
        os.setsid()
    # the child: stdin from /dev/null, stdout and stderr to their files (appended), as Popen(stdout=f, stderr=g)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        out = os.open(request[name], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(out, fd)
        os.close(out)
    if request["fsize_limit"] is not None:  # a full disk: writes past the limit fail (EFBIG) instead of killing it
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize_limit"], request["fsize_limit"]))
    if request["argv"][0] == "-m":
        sys.argv = list(request["argv"][1:])  # run_module puts the module's file in argv[0], as -m does
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
        return
    sys.argv = list(request["argv"])
    runpy.run_path(sys.argv[0], run_name="__main__")


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
        if self.returncode is None and self._running():
            return None  # no round trip to the zygote: tests poll in tight loops to aim their signals
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def _running(self) -> bool:
        """Whether the child has not exited yet: until the zygote reaps it, an exited child is a zombie (state Z)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return stat[stat.rindex(")") + 2] != "Z"

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # not reaped yet: the pid is still this process's (maybe a zombie's)
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """Starts `python zygote.py` and talks to it; `spawn` forks `python SCRIPT ...` for the scripts in SCRIPTS."""

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
            raise RuntimeError(f"the zygote died: {self.stderr_path.read_text()[-3000:]}")
        return json.loads(line)

    def request(self, **request: Any) -> dict[str, Any]:
        with self._lock:
            stdin: IO[str] = self._proc.stdin  # type: ignore[assignment]
            stdin.write(json.dumps(request) + "\n")
            stdin.flush()
            return self._read()

    def spawn(self, argv: list[str | Path], stdout: Path, stderr: Path | None = None,
              fsize_limit: int | None = None, new_session: bool = False) -> ForkedProcess:
        """Like Popen([python, script, *args] or [python, "-m", "streamtrain", *args], stdout=open(stdout, "ab"),
        stderr=open(stderr, "ab") or STDOUT, start_new_session=new_session), in a child whose RLIMIT_FSIZE is
        ``fsize_limit`` (SIGXFSZ ignored) when one is given."""
        args = [str(a) for a in argv]
        assert args[0] == sys.executable and (Path(args[1]).name in SCRIPTS or (args[1] == "-m" and args[2] in MODULES)), args
        pid = self.request(op="spawn", argv=args[1:], stdout=str(stdout), stderr=str(stderr or stdout),
                           fsize_limit=fsize_limit, new_session=new_session)["pid"]
        return ForkedProcess(self, pid, args)

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(timeout=60)


if __name__ == "__main__":
    _zygote_main()
