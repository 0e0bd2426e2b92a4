"""Hostile programs, run for real through the sandbox. Each must be contained, get
a result, leave no process behind, and leave the pool working for the next one."""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time
from pathlib import Path

import pytest

from testtime.sandbox import Limits, Sandbox, SandboxError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")

API_KEY = "sk-canary-" + secrets.token_hex(8)


def _patched_server(directory: Path, name: str, patch: str) -> Path:
    """The real server, with `patch` (Python run on its module `_server`) applied first."""
    import testtime.sandbox as sandbox_mod

    wrapper = directory / f"{name}.py"
    wrapper.write_text("import sys\n"
                       f"sys.path.insert(0, {str(Path(sandbox_mod.__file__).parent)!r})\n"
                       "import _server\n"
                       f"{patch}\n"
                       "_server.main()\n")
    return wrapper


@pytest.fixture(scope="module", params=["clone", "leader"])
def sb(request, tmp_path_factory):
    """Both ways to a PID namespace per program: one clone() straight into it, and
    (where the raw clone is not available) a leader process that unshares it."""
    import testtime.sandbox as sandbox_mod

    mp = pytest.MonkeyPatch()
    if request.param == "leader":
        mp.setattr(sandbox_mod, "SERVER", _patched_server(tmp_path_factory.mktemp("server"), "server_leader",
                                                          "_server._SYS_CLONE = None"))
    os.environ["OPENAI_API_KEY"] = API_KEY  # the host has a secret in its environment
    try:
        with Sandbox(workers=2, limits=Limits(timeout_s=2.0, mem_mb=512)) as s:
            s.mode = request.param
            yield s
    finally:
        del os.environ["OPENAI_API_KEY"]
        mp.undo()


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _sandbox_uid_processes(sb: Sandbox) -> list[int]:
    uids = {sb.uid_base + i for i in range(sb.workers)}
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid in uids:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _wait_until(condition, seconds: float) -> None:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.05)


def _still_works(sb: Sandbox) -> None:
    assert sb.run("assert sum(range(10)) == 45\n").ok


def test_isolation_is_reported(sb):
    iso = sb.isolation
    assert iso["process_group"] and "network" in iso and "rlimits" in iso
    text = sb.summary()
    assert "network:" in text and "rlimits:" in text
    if os.geteuid() == 0:  # this machine: everything is available to root
        assert iso["network"].startswith("namespace")
        assert iso["pid_namespace"] is True
        assert iso["pid_namespace_by"] == sb.mode
        assert iso["user"].startswith("uid ")


def test_ordinary_program_passes_and_output_is_captured(sb):
    r = sb.run("print('hello from the sandbox')\n")
    assert r.ok and "hello from the sandbox" in r.output


@pytest.mark.parametrize("code", ["import sys\nsys.exit(0)\nassert False\n",
                                  "import os\nos._exit(0)\n",
                                  "raise SystemExit\n"])
def test_exiting_before_the_last_line_is_not_a_pass(sb, code):
    r = sb.run(code)
    assert not r.ok and r.status in {"exception", "exited"}


def test_output_is_capped_and_drained(sb):
    r = sb.run("import sys\nfor _ in range(20000):\n    sys.stdout.write('x' * 1000)\n")
    assert r.ok
    assert len(r.output) <= sb.limits.output_cap
    assert r.output_bytes == 20_000_000


def test_fork_bomb(sb):
    code = ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    t = time.perf_counter()
    r = sb.run(code)
    assert r.status in {"timeout", "signal", "exception"} and not r.ok
    assert time.perf_counter() - t < sb.limits.timeout_s + 5
    if os.geteuid() == 0:
        _wait_until(lambda: not _sandbox_uid_processes(sb), 3)
        assert _sandbox_uid_processes(sb) == []
    _still_works(sb)


def test_memory_bomb(sb):
    r = sb.run("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))\n")
    assert r.status == "exception" and r.exception == "MemoryError"
    _still_works(sb)


def test_busy_loop_inside_c_code_is_killed_from_outside(sb):
    # Catastrophic backtracking: the time goes inside the regex engine's C loop,
    # where no Python-level alarm can interrupt it.
    t = time.perf_counter()
    r = sb.run("import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')\n")
    assert r.status == "timeout"
    assert time.perf_counter() - t < sb.limits.timeout_s + 3
    _still_works(sb)


def test_ten_gigabyte_file(sb):
    code = ("with open('big.bin', 'wb') as f:\n"
            "    for _ in range(10 * 1024):\n"
            "        f.write(b'\\0' * (1 << 20))\n")
    r = sb.run(code)
    assert not r.ok
    assert r.status in {"exception", "signal", "timeout"}
    _still_works(sb)


def test_no_network_to_a_public_address(sb):
    code = ("import socket\ns = socket.socket()\ns.settimeout(1.5)\n"
            "s.connect(('1.1.1.1', 80))\nprint('CONNECTED')\n")
    r = sb.run(code)
    assert not r.ok and "CONNECTED" not in r.output
    if sb.isolation["network"].startswith("namespace"):
        assert r.exception == "OSError"  # unreachable at once, not a slow timeout


def test_no_network_to_the_hosts_loopback(sb):
    if not sb.isolation["network"].startswith("namespace"):
        pytest.skip("no network namespace on this machine: loopback is reachable (reported as such)")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        code = (f"import socket\ns = socket.socket()\ns.settimeout(1.5)\n"
                f"s.connect(('127.0.0.1', {port}))\ns.sendall(b'leak')\nprint('CONNECTED')\n")
        r = sb.run(code)
        assert not r.ok and "CONNECTED" not in r.output
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected
    finally:
        server.close()


def test_secrets_stay_out_of_reach(sb):
    home = Path.home()
    secret_dir = home / f".testtime-canary-{secrets.token_hex(4)}"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "id_rsa").write_text("PRIVATE KEY CANARY")
    try:
        code = (f"import os, glob\n"
                f"found = glob.glob({str(secret_dir)!r} + '/*') + glob.glob(os.path.expanduser('~/.ssh/*'))\n"
                "found += glob.glob('/root/.ssh/*') + glob.glob('/home/*/.ssh/*')\n"
                "print('FILES', found)\n"
                "print('ENV', dict(os.environ))\n"
                "try:\n    print('INIT', open('/proc/1/environ', 'rb').read()[:200])\n"
                "except OSError as e:\n    print('INIT denied', e.errno)\n"
                "assert not found and not os.environ\n")
        r = sb.run(code)
        assert API_KEY not in r.output and "PRIVATE KEY CANARY" not in r.output
        assert "INIT denied" in r.output
        assert r.ok, r  # nothing was found, the environment was empty
    finally:
        (secret_dir / "id_rsa").unlink()
        secret_dir.rmdir()


def test_reload_and_ctypes_do_not_undo_the_isolation(sb):
    # The guards are the kernel's (namespaces, uid, rlimits), not Python-level
    # monkeypatching, so reloading modules or calling libc directly changes nothing.
    code = ("import importlib, os, ctypes, resource, socket\n"
            "importlib.reload(os)\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "escaped = []\n"
            "if libc.setuid(0) == 0 and os.getuid() == 0 and os.geteuid() == 0 and os.getppid() != 0:\n"
            "    escaped.append('root')\n"
            "try:\n"
            "    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
            "    escaped.append('rlimit')\n"
            "except (ValueError, OSError):\n    pass\n"
            "try:\n"
            "    socket.create_connection(('1.1.1.1', 80), timeout=1)\n"
            "    escaped.append('network')\n"
            "except OSError:\n    pass\n"
            "print('ESCAPED', escaped)\n"
            "assert escaped, 'contained'\n")
    r = sb.run(code)
    assert not r.ok and r.exception == "AssertionError", r
    assert "ESCAPED []" in r.output


def test_killing_the_parent(sb):
    r = sb.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(-1, signal.SIGKILL)\n"
               "import time\ntime.sleep(0.1)\n")
    assert r.status in {"ok", "signal", "exception", "exited", "timeout"}
    _still_works(sb)
    _still_works(sb)  # both workers


def test_grandchild_left_running_is_killed(sb):
    marker = f"{1000 + secrets.randbelow(1000)}.{secrets.randbelow(10 ** 6)}"
    code = ("import os\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            f"        os.execv('/bin/sleep', ['sleep', {marker!r}])\n"
            "    os._exit(0)\n"
            "import time\ntime.sleep(0.3)\n")
    r = sb.run(code)
    assert r.ok, r
    _wait_until(lambda: not _processes_with(marker), 3)
    assert _processes_with(marker) == []


def test_timeout_leaves_no_process_behind(sb):
    marker = f"{2000 + secrets.randbelow(1000)}.{secrets.randbelow(10 ** 6)}"
    code = ("import os, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            f"    os.execv('/bin/sleep', ['sleep', {marker!r}])\n"
            "time.sleep(60)\n")
    r = sb.run(code)
    assert r.status == "timeout"
    _wait_until(lambda: not _processes_with(marker), 3)
    assert _processes_with(marker) == []


def test_a_long_runner_yields_the_cpu(sb):
    """After NICE_AFTER_S of CPU a program runs at nice 19, and so does its
    session's scheduler autogroup where the kernel has them (else the nice would
    count only inside the program's own session)."""
    import threading

    marker = f"busy-{secrets.token_hex(6)}"
    t = threading.Thread(target=sb.run, args=(f"import os\nos.execv('/bin/sh', ['sh', '-c', 'while :; do :; done', "
                                              f"'{marker}'])\n",), daemon=True)
    t.start()
    _wait_until(lambda: _processes_with(marker), 5)
    (pid,) = _processes_with(marker)

    def nice() -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])

    assert nice() == 0
    _wait_until(lambda: nice() == 19, sb.limits.timeout_s - 0.5)
    assert nice() == 19
    autogroup = Path(f"/proc/{pid}/autogroup")
    if autogroup.exists():
        assert autogroup.read_text().split()[-1] == "19", autogroup.read_text()
    t.join(timeout=sb.limits.timeout_s + 5)
    assert _processes_with(marker) == []


def test_a_program_that_waits_is_not_reniced(sb):
    """Renicing follows CPU used, not time waited: a sleeper keeps its priority."""
    r = sb.run("import os, time\ntime.sleep(0.6)\nassert os.getpriority(os.PRIO_PROCESS, 0) == 0\n")
    assert r.ok, r


def test_a_batch_of_hostile_programs_goes_on(sb):
    programs = ["while True: pass\n", "x = bytearray(2**40)\n", "import os\nos._exit(3)\n",
                "def f(): return f()\nf()\n", "assert 2 + 2 == 4\n"]
    results = sb.run_many(programs)
    assert [r.status for r in results][-1] == "ok"
    assert results[0].status == "timeout"
    assert results[1].exception == "MemoryError"
    assert results[2].status == "exited" and results[2].exit_code == 3
    assert results[3].exception == "RecursionError"


def test_a_dead_worker_is_replaced(sb):
    w = sb._idle.get()
    sb._idle.put(w)
    w.proc.kill()
    w.proc.wait()
    for _ in range(sb.workers + 1):
        _still_works(sb)


@pytest.fixture
def no_namespaces(monkeypatch, tmp_path):
    """Workers whose kernel refuses every namespace: the real server, with its
    unshare() and clone() calls failing as they do in a locked-down container."""
    import testtime.sandbox as sandbox_mod

    patch = ("def deny(flags):\n"
             "    raise OSError(1, 'Operation not permitted')\n"
             "_server._unshare = deny\n"
             "_server.clone_fork = deny\n")
    monkeypatch.setattr(sandbox_mod, "SERVER", _patched_server(tmp_path, "server_without_namespaces", patch))


def test_required_network_isolation_refuses_to_start_without_it(no_namespaces):
    with pytest.raises(SandboxError, match="network isolation was required"):
        Sandbox(workers=1, network="required")


def test_without_namespaces_the_report_says_so_and_limits_still_hold(no_namespaces):
    with Sandbox(workers=1, limits=Limits(timeout_s=1.5)) as s:
        work_root = Path(s.isolation["work_root"])  # in the host's temporary directory, removed on close
        assert work_root.is_dir()
        assert s.run("open('left_behind.txt', 'w').write('x')\nimport os\nos.mkdir('sub')\n").ok
        assert s.isolation["network"].startswith("host network")
        assert s.isolation["pid_namespace"] is False and s.isolation["pid_namespace_by"] is None
        assert "not isolated" in s.summary()
        assert s.run("x = 1\n").ok
        assert s.run("x = bytearray(2**40)\n").exception == "MemoryError"
        assert s.run("while True: pass\n").status == "timeout"
        if os.geteuid() == 0:  # without a PID namespace, the worker's uid is swept instead
            marker = f"{3000 + secrets.randbelow(1000)}.{secrets.randbelow(10 ** 6)}"
            r = s.run("import os\nif os.fork() == 0:\n    os.setsid()\n"
                      f"    os.execv('/bin/sleep', ['sleep', {marker!r}])\n")
            assert r.ok
            time.sleep(0.2)
            assert _processes_with(marker) == []
    assert not work_root.exists()


def test_sandbox_that_cannot_start_is_an_error_not_a_host_run(monkeypatch, tmp_path):
    import testtime.sandbox as sandbox_mod

    monkeypatch.setattr(sandbox_mod, "SERVER", tmp_path / "missing_server.py")
    with pytest.raises(SandboxError, match="did not start"):
        Sandbox(workers=1)


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="mem_mb"):
        Limits(mem_mb=0)
    with pytest.raises(ValueError, match="network"):
        Sandbox(workers=1, network="off")


def test_closing_the_sandbox_mid_program_leaves_nothing_behind():
    """close() kills the workers; a program they were running dies with them."""
    import threading

    marker = f"{5000 + secrets.randbelow(1000)}.{secrets.randbelow(10 ** 6)}"
    s = Sandbox(workers=1, limits=Limits(timeout_s=60.0))
    results = []
    t = threading.Thread(target=lambda: results.append(
        s.run(f"import os\nos.execv('/bin/sleep', ['sleep', '{marker}'])\n")), daemon=True)
    t.start()
    _wait_until(lambda: _processes_with(marker), 10)
    assert _processes_with(marker), "the program never started"
    s.close()
    t.join(timeout=15)
    assert results and results[0].status == "infra_error", results
    _wait_until(lambda: not _processes_with(marker), 5)
    assert _processes_with(marker) == []
    with pytest.raises(SandboxError, match="closed"):
        s.run("pass\n")


def _host_running_sleep(timeout_s: float):
    """A separate host process whose sandbox is running `sleep MARKER` (the script
    goes in on stdin, so only the program's command line holds the marker):
    (host, its worker's pid, marker)."""
    import subprocess

    marker = f"{4000 + secrets.randbelow(1000)}.{secrets.randbelow(10 ** 6)}"
    script = ("from testtime.sandbox import Sandbox, Limits\n"
              f"s = Sandbox(workers=1, limits=Limits(timeout_s={timeout_s}))\n"
              "print(s._all[0].proc.pid, flush=True)\n"
              f"s.run(\"import os\\nos.execv('/bin/sleep', ['sleep', '{marker}'])\\n\")\n")
    host = subprocess.Popen([sys.executable, "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    host.stdin.write(script.encode())
    host.stdin.close()
    server_pid = int(host.stdout.readline())
    _wait_until(lambda: _processes_with(marker), 10)
    assert _processes_with(marker), "the program never started"
    return host, server_pid, marker


def test_worker_killed_mid_program_takes_the_program_with_it():
    """The program dies with its worker even when the host cannot act (stopped)."""
    import signal

    host, server_pid, marker = _host_running_sleep(60.0)
    try:
        host.send_signal(signal.SIGSTOP)
        os.kill(server_pid, signal.SIGKILL)
        _wait_until(lambda: not _processes_with(marker), 5)
        assert _processes_with(marker) == []
    finally:
        host.kill()
        host.wait()


def test_host_killed_mid_program_leaves_nothing_behind():
    """kill -9 of the process that owns the sandbox: the worker sees its stdin close and
    kills the running program at once (issue 16.4: it used to live on until its limit
    plus a 10 s backstop), then exits."""
    host, server_pid, marker = _host_running_sleep(60.0)
    host.kill()
    host.wait()
    _wait_until(lambda: not (_processes_with(marker) or Path(f"/proc/{server_pid}").exists()), 5)
    assert _processes_with(marker) == []
    assert not Path(f"/proc/{server_pid}").exists() or \
        Path(f"/proc/{server_pid}/stat").read_text().split()[2] == "Z"


WALK = r'''
import os
mounts = {}
for line in open("/proc/self/mountinfo"):
    left, right = line.split(" - ")
    mounts[left.split()[4]] = right.split()[0]  # mount point -> file system type
writable, foreign = [], []
for root, dirs, files in os.walk("/", topdown=True):
    dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys")]
    if os.access(root, os.W_OK):
        writable.append(root)
        # the program's own: a tmpfs mounted for it (or a folder inside one)
        top = max((m for m in mounts if root == m or root.startswith(m.rstrip("/") + "/")), key=len)
        if mounts[top] != "tmpfs":
            foreign.append(root)
        dirs[:] = []
pids = [p for p in os.listdir("/proc") if p.isdigit()]
print("FOREIGN", sorted(foreign))
print("WRITABLE", len(writable))
print("PIDS", len(pids))
for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
    if os.access(d, os.W_OK):
        open(os.path.join(d, "left-behind"), "w").write("secret")
'''


def test_a_program_can_write_only_to_its_own_fresh_tmpfs_and_sees_no_host_process(sb):
    """Issue 16.1-3: /run/lock was writable on the host's disk; /tmp, /var/tmp and
    /dev/shm were shared by the programs of a worker; /proc was the host's."""
    from dataclasses import replace

    host_file = Path("/run/lock/left-behind")
    host_file.unlink(missing_ok=True)  # left by a run of this test against code without the fix
    limits = sb.limits
    sb.limits = replace(limits, timeout_s=300.0)  # the walk lists every directory on the machine
    try:
        first = sb.run(WALK)
    finally:
        sb.limits = limits
    assert first.status == "ok", (first.status, first.message, first.output)
    lines = dict(line.split(" ", 1) for line in first.output.splitlines())
    assert lines["FOREIGN"] == "[]"  # every writable directory is a tmpfs of the program's own
    assert int(lines["WRITABLE"]) >= 1
    assert int(lines["PIDS"]) <= 2  # its own PID namespace's processes, not the host's
    for _ in range(sb.workers):  # whichever worker runs it: nothing the first program left
        nxt = sb.run("import os\nprint(sorted(p for d in ('/tmp', '/var/tmp', '/dev/shm', '/run/lock') "
                     "for p in ([os.path.join(d, 'left-behind')] if os.path.exists(os.path.join(d, 'left-behind')) "
                     "else [])))")
        assert nxt.status == "ok" and nxt.output.strip() == "[]", nxt.output
    assert not host_file.exists()  # and nothing reached the host's disk

