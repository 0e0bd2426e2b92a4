"""Run untrusted programs: a pool of pre-started, isolated fork servers.

Each worker is a Python process (`_server.py`) started with an empty environment,
in its own network and mount namespaces where the kernel allows them (as root,
or as any user through a user namespace). Per program it clones one process
into a new session and a new PID namespace, whose init it is (see `_server`), so:

- the wall-clock limit is enforced here, from outside, by killing the group, and
  the PID namespace takes every descendant with it, those that called setsid() too;
- rlimits cap CPU seconds, address space, processes, file size and open files;
- the program runs as an unprivileged uid (when we are root), in a fresh work
  directory on a size-capped tmpfs, with home directories and /tmp hidden;
- output is captured up to a cap and the rest drained;
- a pass needs a sentinel that the harness writes after the program's last
  line (see `_server._program`), so a program that exits early never passes.
  It runs in the program's own process: code written to forge it can.

What was in force is `Sandbox.isolation`, and it goes into every report. If a
worker cannot start at all, `SandboxError` is raised: code never runs unprotected
on the host instead.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable
from ..errors import InfrastructureError, InputError

SERVER = Path(__file__).with_name("_server.py")


class SandboxError(InfrastructureError):
    """The sandbox could not start or stopped working: an infrastructure failure,
    never a verdict on the code."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0
    """Wall-clock seconds per program; the CPU limit is this plus one."""
    mem_mb: int = 1024
    """Address space of the program's process."""
    nproc: int = 32
    """Processes of the sandbox uid (binding only when running as root drops to it)."""
    fsize_mb: int = 16
    """Largest file the program may write."""
    nofile: int = 64
    output_cap: int = 8192
    """Bytes of stdout+stderr kept; the rest is read and dropped."""
    tmpfs_mb: int = 128
    """Size of the tmpfs that holds the work directories (with a mount namespace)."""

    def __post_init__(self) -> None:
        for name in ("mem_mb", "nproc", "fsize_mb", "nofile", "output_cap", "tmpfs_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"sandbox limit {name} must be a positive integer, got {value!r}")
        if not self.timeout_s > 0:
            raise InputError(f"sandbox limit timeout_s must be > 0, got {self.timeout_s!r}")


@dataclass
class ExecResult:
    """How one program ended."""

    status: str
    """'ok' (ran to the end and wrote the sentinel), 'exception', 'exited' (ended
    before its last line), 'signal', 'timeout' or 'infra_error'."""
    exception: str | None = None
    message: str = ""
    line: int | None = None
    """Line of the program where the exception was raised (innermost frame in it)."""
    exit_code: int | None = None
    signal: int | None = None
    seconds: float = 0.0
    output: str = ""
    output_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


NICE_AFTER_S = 0.25
"""A program whose processes have used this much CPU is reniced to 19 (see
`_Worker.run`)."""

_POLL_S = 0.05
_TICK = os.sysconf("SC_CLK_TCK")


def _group_cpu_seconds(pgid: int) -> float:
    """CPU seconds that the live processes of a process group have used themselves
    (a leader's waiting costs nothing, so its program is what counts)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass  # gone meanwhile
    return total / _TICK


def _lower_priority(pgid: int) -> None:
    """Nice 19 for the program's process group, and for its session's autogroup.
    A program is its own session, and where the kernel groups sessions for the
    scheduler (sched_autogroup_enabled) a process's nice counts only inside its
    session's group: without the second step a busy loop kept a fair share of a
    core (measured: 13 time-outs among 2624 HumanEval samples took 3.6 s of the
    run's 12 s)."""
    try:
        os.setpriority(os.PRIO_PGRP, pgid, 19)
    except OSError:
        pass
    try:
        with open(f"/proc/{pgid}/autogroup", "w") as f:
            f.write("19")
    except OSError:  # no autogroups here, or the program is gone
        pass

HIDE = ("/root", "/home", "/tmp", "/var/tmp", "/dev/shm", "/run/user", "/run/lock", "/mnt", "/media")
"""Covered by an empty tmpfs: in each worker, and again in each program (a fresh one per
program, so nothing one program leaves there is seen by the next). /run/lock is
world-writable on the host's disk on most distributions."""


class _Worker:
    def __init__(self, index: int, limits: Limits, network: str, uid: int | None):
        self.index = index
        cfg = {"uid": uid, "network": network, "tmpfs_mb": limits.tmpfs_mb, "mem_mb": limits.mem_mb,
               "nproc": limits.nproc, "fsize_mb": limits.fsize_mb, "nofile": limits.nofile,
               "hide": list(dict.fromkeys(HIDE + ((os.environ["HOME"],) if os.environ.get("HOME") else ())))}
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", str(SERVER), json.dumps(cfg)], env={},
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         start_new_session=True, cwd="/")
        except OSError as e:
            raise SandboxError(f"cannot start a sandbox worker with {sys.executable}: {e}") from None
        self._buf = b""
        self.isolation: dict[str, Any] = {}

    def wait_ready(self) -> "_Worker":
        """Wait for the server's hello (workers start in parallel: start them all,
        then wait for each)."""
        hello = self._read(deadline=time.monotonic() + 30)
        if hello is None or not hello.get("ready"):
            self.kill()
            why = hello.get("error") if hello else "it exited before reporting ready"
            raise SandboxError(f"sandbox worker {self.index} did not start: {why}")
        self.isolation = hello["isolation"]
        return self

    def _read(self, deadline: float) -> dict | None:
        """Next protocol line, or None at EOF, when the deadline passes, or when the
        worker was closed meanwhile."""
        try:
            fd = self.proc.stdout.fileno()
        except ValueError:  # closed
            return None
        while b"\n" not in self._buf:
            wait = deadline - time.monotonic()
            try:
                if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                    return None
                chunk = os.read(fd, 65536)
            except (OSError, ValueError):  # closed by Sandbox.close() from another thread
                return None
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, code: str, limits: Limits) -> ExecResult:
        job = {"code": code, "timeout": limits.timeout_s, "output_cap": limits.output_cap}
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
        except (OSError, ValueError) as e:  # a broken pipe, or closed by Sandbox.close()
            return ExecResult("infra_error", message=f"sandbox worker {self.index} is gone: {e}")
        started = self._read(deadline=time.monotonic() + 10)
        if not started or "started" not in started:
            return ExecResult("infra_error", message=f"sandbox worker {self.index} did not start the program")
        pgid = started["started"]
        deadline = time.monotonic() + limits.timeout_s
        # A program that has used NICE_AFTER_S of CPU (often a busy loop waiting out
        # its limit) yields the CPU to the other workers' programs; its wall-clock
        # limit is unchanged. CPU, not wall time: under load a short program takes
        # longer on the wall clock, and must not be starved for it.
        msg = self._read(min(deadline, time.monotonic() + _POLL_S))
        while msg is None and time.monotonic() < deadline and self.alive():
            if _group_cpu_seconds(pgid) >= NICE_AFTER_S:
                _lower_priority(pgid)
                msg = self._read(deadline)
                break
            msg = self._read(min(deadline, time.monotonic() + _POLL_S))
        timed_out = False
        if msg is None and self.alive():
            timed_out = True
            try:
                os.killpg(pgid, signal.SIGKILL)  # the namespace's init and everything in its group
            except ProcessLookupError:
                pass
            msg = self._read(deadline=time.monotonic() + 10)
        if msg is None or "result" not in msg:
            return ExecResult("infra_error", message=f"sandbox worker {self.index} stopped answering")
        r = msg["result"]
        if "infra_error" in r:
            return ExecResult("infra_error", message=r["infra_error"])
        res = ExecResult("exited", exit_code=r["exit_code"], signal=r["signal"], seconds=r["seconds"],
                         output=r["output"], output_bytes=r["output_bytes"])
        report = r["report"]
        if timed_out:
            res.status, res.message = "timeout", f"killed after {limits.timeout_s:g} s wall clock"
        elif report and report.get("done"):
            res.status = "ok"
        elif report and "exc" in report:
            res.status, res.exception, res.message, res.line = ("exception", report["exc"], report.get("msg", ""),
                                                                report.get("line"))
        elif res.signal is not None:
            res.status = "timeout" if res.signal == signal.SIGXCPU else "signal"
            res.message = f"killed by {signal.Signals(res.signal).name}" if res.signal in signal.valid_signals() \
                else f"killed by signal {res.signal}"
        else:
            res.message = f"exited with code {res.exit_code} before its last line ran"
        return res

    def kill(self) -> None:
        if self.proc.poll() is None:  # not yet reaped, so its pid is still its own
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def default_workers() -> int:
    """Four per core: a program waiting out its time limit holds its worker (its
    CPU share drops after `NICE_AFTER_S`), so spare workers keep the cores busy.
    Measured on 2 cores with 13 time-outs among 2624 HumanEval samples: 4 workers
    16.4 s, 8 workers 12.8-13.9 s, 16 workers 12.6 s. A worker is an idle process
    of about 20 MB."""
    return 4 * max(1, len(os.sched_getaffinity(0)))


@dataclass
class Sandbox:
    """A pool of isolated workers. Use as a context manager, or call close().

    network: 'auto' isolates the network wherever a namespace can be had and says
    so in `isolation`; 'required' refuses to start without it.
    """

    workers: int = field(default_factory=default_workers)
    limits: Limits = field(default_factory=Limits)
    network: str = "auto"
    uid_base: int = 62000
    """When running as root, worker i runs programs as uid/gid uid_base + i."""

    def __post_init__(self) -> None:
        if self.network not in ("auto", "required"):
            raise InputError(f"network must be 'auto' or 'required', got {self.network!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise InputError(f"workers must be a positive integer, got {self.workers!r}")
        if not sys.platform.startswith("linux"):
            raise SandboxError(f"the sandbox needs Linux (process groups, namespaces, rlimits); this is {sys.platform}")
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        try:
            for i in range(self.workers):  # all start at once...
                self._all.append(_Worker(i, self.limits, self.network, self._uid(i)))
            for w in self._all:  # ...and are waited for in turn
                self._idle.put(w.wait_ready())
        except SandboxError:
            self.close()
            raise
        self.isolation: dict[str, Any] = self._all[0].isolation

    def _uid(self, index: int) -> int | None:
        return self.uid_base + index if os.geteuid() == 0 else None

    def summary(self) -> str:
        """The isolation in force, in one line for reports."""
        iso = self.isolation
        parts = [f"network: {iso['network']}",
                 "PID namespace per program" if iso.get("pid_namespace") else "no PID namespace",
                 f"user: {iso['user']}",
                 f"hidden: {', '.join(iso['hidden_paths']) or 'nothing'}"
                 + (f" (except the interpreter, read-only: {', '.join(iso['read_only_inside_hidden'])})"
                    if iso.get("read_only_inside_hidden") else ""),
                 f"workdir: {iso['workdir']}",
                 f"per program: {iso.get('per_program', 'shared with the worker')}",
                 "rlimits: " + ", ".join(f"{k}={v}" for k, v in iso["rlimits"].items()),
                 "empty environment", "wall clock killed from outside"]
        return "; ".join(parts)

    def run(self, code: str) -> ExecResult:
        """Run one program on an idle worker. A worker that failed (died, or stopped
        answering) is replaced and the program tried once more on the new one
        before giving up with infra_error."""
        if self._closed:
            raise SandboxError("the sandbox is closed")
        w = self._idle.get()
        try:
            res = w.run(code, self.limits)
            if res.status == "infra_error" and not self._closed:
                # dead, or out of step with its protocol: either way a fresh worker
                w = self._replace(w)
                res = w.run(code, self.limits)
            return res
        finally:
            self._idle.put(w)

    def _replace(self, dead: _Worker) -> _Worker:
        dead.kill()
        with self._lock:
            self._all.remove(dead)
        w = _Worker(dead.index, self.limits, self.network, self._uid(dead.index)).wait_ready()
        with self._lock:
            self._all.append(w)
        return w

    def run_many(self, programs: Iterable[str]) -> list[ExecResult]:
        """Run programs in parallel over the pool; results in input order."""
        programs = list(programs)
        if len(programs) <= 1 or self.workers == 1:
            return [self.run(p) for p in programs]
        with ThreadPoolExecutor(self.workers) as ex:
            return list(ex.map(self.run, programs))

    def close(self) -> None:
        """Stop every worker. A program still running dies with its worker, and its
        run() returns infra_error."""
        self._closed = True
        with self._lock:
            workers, self._all = self._all, []
        # An idle worker exits at the end of its input and cleans up after itself;
        # one still running a program (or stuck) is killed after a second.
        for w in workers:
            try:
                w.proc.stdin.close()
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 1.0
        for w in workers:
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            w.kill()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        return {"isolation": self.isolation, "limits": asdict(self.limits), "workers": self.workers,
                "summary": self.summary()}
