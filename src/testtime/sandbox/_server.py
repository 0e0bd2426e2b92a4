"""The sandbox's fork server. Standard library only; run as `python -I _server.py CONFIG`.

It is started once per worker by `testtime.sandbox.Sandbox`, sets up its isolation
(network and mount namespaces, hidden home directories, a size-capped tmpfs for
work directories), imports the usual modules once, then runs one program per
request. For each program it clones one process straight into a new PID
namespace (`clone(CLONE_NEWPID)`), which starts a new session (so the program
has its own process group) and is that namespace's init: when it exits or is
killed, the kernel kills every process left in the namespace, grandchildren that
left the process group included. It sets its rlimits, moves into a fresh work
directory, drops to the worker's unprivileged uid and runs the code. Where the
raw clone is not available (an architecture whose syscall number is not known
here), a *leader* process unshares the PID namespace and forks the program as
its init instead: the same isolation for one more fork per program.

Protocol, one JSON object per line: the host writes `{"code", "timeout", ...}`;
the server answers `{"started": pgid}` at once and `{"result": {...}}` when the
process group is gone. The wall-clock limit is the host's: it kills the group.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import itertools
import json
import os
import resource
import secrets
import select
import shutil
import signal
import sys
import tempfile
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (0x1, 0x2, 0x4, 0x8, 0x20, 0x1000,
                                                                           0x4000, 0x40000)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

# clone(2) as fork() into new namespaces: flags | SIGCHLD and no new stack, so the
# child goes on from the call on a copy of this one. Called through the Python API
# handle, which keeps the GIL held across the call (the CDLL handle would drop it).
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine)
_api = ctypes.PyDLL(None, use_errno=True)
_api.syscall.restype = ctypes.c_long
_api.syscall.argtypes = [ctypes.c_long, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p]


def clone_fork(flags: int) -> int:
    """Like os.fork(), with the child in the namespaces `flags` asks for (the
    interpreter's fork hooks run as they do for os.fork). Raises OSError when the
    kernel refuses and NotImplementedError on an architecture not listed above."""
    if _SYS_CLONE is None:
        raise NotImplementedError(f"raw clone() on {os.uname().machine}")
    _api.PyOS_BeforeFork()
    pid = _api.syscall(_SYS_CLONE, flags | signal.SIGCHLD, None, None, None, None)
    if pid == 0:
        _api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno() if pid < 0 else 0
    _api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return pid

# Imported once here so that a forked program finds them ready.
WARM = ("math", "re", "string", "itertools", "functools", "collections", "heapq", "bisect", "typing",
        "hashlib", "random", "statistics", "fractions", "decimal", "datetime", "copy", "operator", "json")


_WARM_PROGRAM = """
import math, re, collections
from typing import List, Optional


class Box:
    def __init__(self, items: List[int]) -> None:
        self.items = [x * 2 for x in items if x % 2 == 0]


def check(candidate, xs: Optional[list] = None) -> str:
    total = sum(x for x in (xs or [1, 2, 3]))
    try:
        assert candidate(total) is not None, f"got {total!r}"
    except (AssertionError, ValueError) as e:
        return str(e)
    return ''.join(sorted({str(k): v for k, v in collections.Counter('abca').items()}))


check(lambda t: math.sqrt(t) if re.match(r"\\d+", str(t)) else None)
Box([1, 2, 3, 4])
"""


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"unshare: {os.strerror(e)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                   data.encode() if data else None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {target}: {os.strerror(e)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _cover(path: str, size_mb: int, keep: list[str]) -> list[str]:
    """Mount an empty tmpfs over `path`, binding back read-only the kept paths inside
    it (the interpreter may live there); returns those."""
    inside = [k for k in keep if k.startswith(path.rstrip("/") + "/")]
    handles = {k: os.open(k, os.O_PATH) for k in inside}
    _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,mode=1777")
    for k, fd in handles.items():
        os.makedirs(k, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", k, None, MS_BIND | MS_REC)
        _mount("none", k, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        os.close(fd)
    return inside


def _private_mounts(cfg: dict, workdir: str) -> None:
    """In the program process, before it drops privileges: its own mount namespace,
    a fresh empty tmpfs over every hidden path (so nothing one program writes there is
    seen by the next, and nothing reaches the host's disk), its work directory again
    inside the fresh /tmp, and a procfs of its own PID namespace (the host's processes
    and their command lines stay out of sight)."""
    _unshare(CLONE_NEWNS)
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    for path in cfg["private"]:
        _cover(path, cfg["tmpfs_mb"] if path == "/tmp" else 1, cfg["keep_paths"])
    os.makedirs(workdir, 0o711, exist_ok=True)
    if cfg.get("uid") is not None:
        os.chown(workdir, cfg["uid"], cfg["uid"])
    if cfg.get("pid_ns"):  # a procfs shows the PID namespace it is mounted in
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def setup(cfg: dict) -> tuple[dict, str]:
    """Enter the namespaces; return the isolation in force and the work root."""
    # Long on purpose: one ordered sequence of unshare/mount/setuid steps, each of which
    # may be unavailable on a given host and is recorded as such; split up, the order
    # (which is the security argument) would be harder to read.
    iso: dict = {"process_group": True, "env": "empty", "wall_clock": "killed from outside"}
    root = os.geteuid() == 0
    outer_uid, outer_gid = os.getuid(), os.getgid()
    namespaces = False
    try:
        _unshare(CLONE_NEWNS | CLONE_NEWNET)
        namespaces = True
    except OSError:
        if not root:
            try:  # an unprivileged user gets the same through a user namespace
                _unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET)
                _write("/proc/self/setgroups", "deny")
                _write("/proc/self/uid_map", f"0 {outer_uid} 1")
                _write("/proc/self/gid_map", f"0 {outer_gid} 1")
                namespaces = True
                iso["user_namespace"] = True
            except OSError as e:
                iso["namespace_error"] = str(e)
    iso["network"] = "namespace (no interfaces)" if namespaces else "host network (not isolated)"

    work_root = None
    hidden, kept = [], []
    if namespaces:
        _mount("none", "/", None, MS_REC | MS_PRIVATE)
        # The interpreter may live under a hidden path (a venv in a home directory or
        # in /tmp): such paths are bound back, read-only, over the empty tmpfs.
        keep = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
                      | {os.path.realpath(p) for p in cfg.get("keep", [])})
        for path in cfg.get("hide", []):
            if not os.path.isdir(path) or os.path.islink(path):
                continue
            if any(path == k or path.startswith(k.rstrip("/") + "/") for k in keep):
                continue  # hiding it would hide the interpreter itself
            kept += _cover(path, cfg["tmpfs_mb"] if path == "/tmp" else 1, keep)
            hidden.append(path)
        if "/tmp" in hidden:
            work_root = "/tmp/work"
            os.mkdir(work_root, 0o711)
    if work_root is None:
        work_root = tempfile.mkdtemp(prefix="testtime-sandbox-")
        os.chmod(work_root, 0o711)
    iso["hidden_paths"] = hidden
    iso["read_only_inside_hidden"] = kept
    if namespaces:
        cfg["private"] = hidden
        cfg["keep_paths"] = keep
        iso["per_program"] = "own mount namespace: fresh tmpfs over the hidden paths, own procfs"
    iso["workdir"] = ("tmpfs, %d MiB" % cfg["tmpfs_mb"]) if "/tmp" in hidden else "host temporary directory"
    if "/tmp" not in hidden:
        iso["work_root"] = work_root  # removed when the server stops (a tmpfs goes with its namespace)

    # Probe the PID namespace in a throwaway child, so the report is what happens:
    # a raw clone into it where that works, else a leader process that unshares it.
    iso["pid_namespace"] = False
    try:
        pid = clone_fork(CLONE_NEWPID)
        if pid == 0:
            os._exit(0 if os.getpid() == 1 else 1)
        _, status = os.waitpid(pid, 0)
        iso["pid_namespace"] = os.waitstatus_to_exitcode(status) == 0
    except (OSError, NotImplementedError):
        pass
    iso["pid_namespace_by"] = "clone" if iso["pid_namespace"] else None
    if not iso["pid_namespace"]:
        pid = os.fork()
        if pid == 0:
            try:
                _unshare(CLONE_NEWPID)
                os._exit(0)
            except OSError:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        iso["pid_namespace"] = os.waitstatus_to_exitcode(status) == 0
        iso["pid_namespace_by"] = "leader" if iso["pid_namespace"] else None

    cfg["pid_ns"] = bool(iso["pid_namespace"])
    uid = cfg.get("uid")
    if uid is not None and root and not iso.get("user_namespace"):
        iso["user"] = f"uid {uid} (unprivileged, no supplementary groups)"
    else:
        cfg["uid"] = None
        iso["user"] = "same uid as the caller" + (" (inside a user namespace)" if iso.get("user_namespace") else "")
    iso["rlimits"] = {k: cfg[k] for k in ("mem_mb", "nproc", "fsize_mb", "nofile")}
    return iso, work_root


def _limits(job: dict, cfg: dict) -> None:
    cpu = int(job["timeout"]) + 1
    mb = 1 << 20
    for res, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, cfg["mem_mb"] * mb),
                       (resource.RLIMIT_FSIZE, cfg["fsize_mb"] * mb), (resource.RLIMIT_NOFILE, cfg["nofile"]),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    if cfg.get("uid") is not None:  # RLIMIT_NPROC counts per real uid and binds only non-root
        resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))


def _program(code: str, status_fd: int, nonce_fd: int) -> None:
    """Runs in the program process: exec the code, then report how it ended. The
    functions used after the code ran are bound before it runs, so the code
    cannot replace them."""
    write, read, exit_, dumps = os.write, os.read, os._exit, json.dumps
    flush_out = sys.stdout.flush
    try:
        exec(compile(code, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except MemoryError:
        report = {"exc": "MemoryError", "msg": ""}
    except SystemExit as e:
        report = {"exc": "SystemExit", "msg": repr(e.code)[:200]}
    except BaseException as e:  # noqa: BLE001 - every way the program ends is reported
        tb, line = e.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "<program>":
                line = tb.tb_lineno
            tb = tb.tb_next
        try:
            msg = str(e)[:300]
        except BaseException:  # noqa: BLE001
            msg = "<unprintable>"
        report = {"exc": type(e).__name__, "msg": msg, "line": line}
    else:
        # The sentinel: a secret read only now that every line ran, so an early
        # sys.exit()/os._exit() never gets here. (The program could have read the
        # pipe itself: this catches programs that end early, not forgers.)
        report = {"done": read(nonce_fd, 64).decode()}
    try:
        flush_out()
    except BaseException:  # noqa: BLE001
        pass
    try:
        write(status_fd, dumps(report).encode())
    finally:
        exit_(0)


def _enter_program(job: dict, cfg: dict, workdir: str, out_r: int, out_w: int, st_r: int, st_w: int,
                   nonce_r: int) -> None:
    """In the program process: wire the pipes, limit, drop privileges, run the code."""
    try:
        os.close(out_r)
        os.close(st_r)
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        keep = sorted({0, 1, 2, st_w, nonce_r})
        top = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        for lo, hi in zip([-1] + keep, keep + [top]):
            if hi - lo > 1:
                os.closerange(lo + 1, hi)
        if cfg.get("private") is not None:
            _private_mounts(cfg, workdir)
        os.chdir(workdir)
        _limits(job, cfg)
        uid = cfg.get("uid")
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        # If the server dies (the host's close() kills it), so does the program. Set
        # after the uid change, which clears it.
        if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        # sys.stdout and sys.stderr are the server's, which write to fds 1 and 2,
        # now the output pipe; their buffers are empty (the server flushes each
        # reply) and main() set errors="replace". Building new ones here cost more
        # than a third of this process's set-up. SIGPIPE stays ignored, as in any
        # Python program.
    except BaseException as e:  # noqa: BLE001
        os.write(st_w, json.dumps({"setup_error": f"{type(e).__name__}: {e}"}).encode())
        os._exit(125)
    _program(job["code"], st_w, nonce_r)


def _kill_uid(uid: int) -> None:
    """Kill every process of the worker's uid (used only without a PID namespace)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


def _start(job: dict, cfg: dict, workdir: str, pipes: tuple[int, ...], pid_ns: str | None) -> int:
    """Start the program in its own session (and PID namespace, as its init);
    return the pid to wait for, whose process group the host kills."""
    out_r, out_w, st_r, st_w, nonce_r = pipes
    if pid_ns == "clone":
        pid = clone_fork(CLONE_NEWPID)
        if pid == 0:
            try:
                os.setsid()
            except BaseException as e:  # noqa: BLE001
                os.write(st_w, json.dumps({"setup_error": f"setsid: {type(e).__name__}: {e}"}).encode())
                os._exit(125)
            _enter_program(job, cfg, workdir, out_r, out_w, st_r, st_w, nonce_r)
        return pid
    leader = os.fork()
    if leader == 0:  # the leader: own session and process group, then the namespace's init
        try:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # dies with the server, and the program with it
            os.setsid()
            if pid_ns == "leader":
                _unshare(CLONE_NEWPID)
            child = os.fork()
            if child == 0:
                _enter_program(job, cfg, workdir, out_r, out_w, st_r, st_w, nonce_r)
            for fd in pipes:
                os.close(fd)
            _, status = os.waitpid(child, 0)
            os._exit(_LEADER_SIGNALLED + os.WTERMSIG(status) if os.WIFSIGNALED(status)
                     else os.WEXITSTATUS(status))
        except BaseException as e:  # noqa: BLE001
            os.write(st_w, json.dumps({"setup_error": f"leader: {type(e).__name__}: {e}"}).encode())
            os._exit(125)
    return leader


_LEADER_SIGNALLED = 128
"""A leader reports its program's death by signal s as exit code 128 + s."""


_jobs = itertools.count()


def _workdir(work_root: str) -> str:
    """A fresh, empty work directory. Only this server (root, or the sandbox's
    own uid without a uid drop) can create entries in work_root, so a counter
    names it; should the name exist all the same, a random one is made."""
    path = os.path.join(work_root, str(next(_jobs)))
    try:
        os.mkdir(path, 0o700)
        return path
    except FileExistsError:
        return tempfile.mkdtemp(dir=work_root)


def _host_gone() -> bool:
    """Whether stdin, which select() reports readable, is at end of file: the host died or
    closed it. The host sends nothing while a program runs, so nothing is consumed here:
    a readable pipe with no bytes in it is EOF."""
    import array
    import fcntl
    import termios

    pending = array.array("i", [0])
    try:
        fcntl.ioctl(0, termios.FIONREAD, pending)
    except OSError:
        return True
    return pending[0] == 0


def run_job(job: dict, cfg: dict, work_root: str, pid_ns: str | None, reply) -> dict:
    # Long on purpose: fork, limits, exec and the reaping loop share the pipes and the
    # child's pid; every exit path must close and kill in the same place.
    workdir = _workdir(work_root)
    uid = cfg.get("uid")
    if uid is not None:
        os.chown(workdir, uid, uid)
    out_r, out_w = os.pipe()
    st_r, st_w = os.pipe()
    nonce_r, nonce_w = os.pipe()
    nonce = secrets.token_hex(16)
    os.write(nonce_w, nonce.encode())
    os.close(nonce_w)
    start = time.perf_counter()
    group = _start(job, cfg, workdir, (out_r, out_w, st_r, st_w, nonce_r), pid_ns)
    for fd in (out_w, st_w, nonce_r):
        os.close(fd)
    reply({"started": group})

    # Read output (capped, the rest drained) and the status until the group is gone.
    # With a PID namespace every process of the program dies with its init, and the
    # pipes close when the last one is gone (a fork bomb takes a moment). Without
    # one, a process that left the group could hold the pipes open for ever, so
    # reading stops shortly after the group's first process has exited and the uid
    # is swept.
    cap = int(job.get("output_cap", 8192))
    out, out_bytes, status_buf = bytearray(), 0, bytearray()
    open_fds = {out_r, st_r}
    status, grace_until = None, None
    # The host kills the group at the wall-clock limit. This later backstop is for a
    # host that died (kill -9) mid-program: nothing outlives it for long.
    backstop = time.monotonic() + float(job["timeout"]) + 10.0
    watch_host = True  # the host closing our stdin (it died, or closed the sandbox) ends the program at once
    while open_fds:
        if time.monotonic() > backstop:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
            backstop = float("inf")
        ready, _, _ = select.select(list(open_fds) + ([0] if watch_host else []), [], [], 0.05)
        if 0 in ready:
            ready.remove(0)
            if _host_gone():
                watch_host = False
                try:
                    os.killpg(group, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.discard(fd)
            elif fd == out_r:
                out_bytes += len(chunk)
                if len(out) < cap:
                    out += chunk[:cap - len(out)]
            elif len(status_buf) < 4096:
                status_buf += chunk
        if status is None:
            done, st = os.waitpid(group, os.WNOHANG)
            if done:
                status, grace_until = st, time.monotonic() + (5.0 if pid_ns else 0.25)
        elif time.monotonic() > grace_until:
            break
    for fd in (out_r, st_r):
        os.close(fd)
    if status is None:
        _, status = os.waitpid(group, 0)
    if uid is not None and not pid_ns:
        _kill_uid(uid)
    seconds = time.perf_counter() - start
    try:
        os.rmdir(workdir)  # most programs leave nothing behind
    except OSError:
        shutil.rmtree(workdir, ignore_errors=True)
    try:
        report = json.loads(status_buf.decode()) if status_buf else None
    except ValueError:
        report = {"exc": "garbled status", "msg": status_buf[:200].decode(errors="replace")}
    if report is not None and "setup_error" in report:
        return {"infra_error": report["setup_error"]}
    if not watch_host:
        # killed because the host went away: not the program's doing, never a verdict on it
        return {"infra_error": "the sandbox was closed (or its host died) while the program ran"}
    if report is not None and "done" in report:
        report = {"done": True} if report["done"] == nonce else {"exc": "forged sentinel", "msg": ""}
    exit_code = signal_num = None
    if os.WIFSIGNALED(status):  # the host's wall-clock kill, an rlimit, or the program itself
        signal_num = os.WTERMSIG(status)
    else:
        exit_code = os.WEXITSTATUS(status)
        if pid_ns != "clone" and exit_code > _LEADER_SIGNALLED:  # a leader passing on its program's signal
            signal_num, exit_code = exit_code - _LEADER_SIGNALLED, None
    return {"report": report, "exit_code": exit_code, "signal": signal_num, "seconds": seconds,
            "output": out.decode(errors="replace"), "output_bytes": out_bytes}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out = sys.stdout

    # A program's output goes through these (see _enter_program): never fail on it.
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.reconfigure(errors="replace")

    def reply(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        iso, work_root = setup(cfg)
    except Exception as e:  # noqa: BLE001
        reply({"ready": False, "error": f"{type(e).__name__}: {e}"})
        return
    if cfg.get("network") == "required" and not iso["network"].startswith("namespace"):
        reply({"ready": False, "error": "network isolation was required but no network namespace could be "
                                        f"created ({iso.get('namespace_error', 'unknown reason')})"})
        return
    for name in WARM:
        __import__(name)
    # The first compile() in a process initialises the compiler, which a forked
    # program would otherwise redo (~4 ms, copying the pages it writes) every time.
    exec(compile(_WARM_PROGRAM, "<warm-up>", "exec"), {"__name__": "__warm__"})
    os.environ.clear()  # started with none; this drops what the interpreter set itself (LC_CTYPE)
    # Every object that exists now is shared with each forked program; a garbage
    # collection in the program would touch them all and copy every page.
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host decides when workers stop
    reply({"ready": True, "isolation": iso})
    try:
        for line in sys.stdin:  # until the host closes it (Sandbox.close) or dies
            if not line.strip():
                continue
            job = json.loads(line)
            try:
                result = run_job(job, cfg, work_root, iso["pid_namespace_by"], reply)
            except OSError as e:
                if e.errno == errno.EPIPE:
                    return
                result = {"infra_error": f"{type(e).__name__}: {e}"}
            reply({"result": result})
    finally:
        if "work_root" in iso:
            shutil.rmtree(work_root, ignore_errors=True)


if __name__ == "__main__":
    main()
