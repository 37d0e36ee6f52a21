"""The sandbox's spec: hostile programs that try to escape or exhaust it.

Each snippet prints ESCAPED if its attack worked. Every case asserts the verdict, that ESCAPED
never appears, the case's own observable (e.g. a host file that must not exist), and that
nothing is left behind: no process under a sandbox uid, no file outside the work directory
(the work root holds no run directory afterwards). One real sandbox process serves them all.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import textwrap
import time
import uuid

import pytest

from conftest import ROOT, ServiceProcess
from forgerpc.clients import SandboxClient
from forgerpc.v1 import sandbox_pb2 as pb

UID_BASE, WORKERS, TIMEOUT = 62000, 2, 1.5
NONCE = uuid.uuid4().hex[:8]
HOST_MARK = f"/tmp/forgerpc-escape-{NONCE}"  # a host path no run may create


@pytest.fixture(scope="module")
def sandbox():
    # Under /tmp itself: pytest's own tmp dirs are 0700, which a sandbox uid cannot traverse
    # in the tiers that run in the host's file tree.
    work_root = tempfile.mkdtemp(prefix="forgerpc-hostile-", dir="/tmp")
    # FORGERPC_SANDBOX_ISOLATION=unshare|none runs the suite against a weaker tier: cases whose
    # layer that tier lacks are skipped, naming the layer.
    isolation = os.environ.get("FORGERPC_SANDBOX_ISOLATION", "auto")
    proc = ServiceProcess("sandbox", f"workers={WORKERS}", f"uid_base={UID_BASE}",
                          f"work_root={work_root}", f"isolation={isolation}", "max_output_bytes=65536",
                          "default_memory_bytes=268435456", env={"FORGERPC_TEST_SECRET": NONCE})
    yield proc, work_root
    proc.stop()
    shutil.rmtree(work_root, ignore_errors=True)


def _sandbox_pids() -> list[int]:
    uids = range(UID_BASE, UID_BASE + WORKERS)
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid in uids and not _zombie(name):
                    found.append(int(name))
            except FileNotFoundError:
                pass
    return found


def _zombie(pid: str) -> bool:
    # A killed process that its (host) parent has not reaped yet: dead, holding only its pid.
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


async def run(sandbox, code: str, **fields) -> pb.ExecuteResponse:
    proc, work_root = sandbox
    async with SandboxClient(proc.address) as client:
        out = await client.execute(code=textwrap.dedent(code), timeout_seconds=TIMEOUT, **fields)
    assert "ESCAPED" not in out.stdout.decode(errors="replace"), out.stdout[-500:]
    assert _sandbox_pids() == [], "a process outlived its run"
    own = list(pathlib.Path(work_root).glob("forgerpc-sandbox-*"))  # the server's directory under work_root
    assert len(own) == 1 and list(own[0].iterdir()) == [], "a run directory was left behind"
    assert not os.path.exists(HOST_MARK)
    assert proc.proc.poll() is None, "the sandbox server died"
    return out


OK, TIMEOUT_, MEM, OUT, ERR, KILLED = (pb.VERDICT_OK, pb.VERDICT_TIMEOUT, pb.VERDICT_MEMORY_LIMIT,
                                       pb.VERDICT_OUTPUT_LIMIT, pb.VERDICT_RUNTIME_ERROR, pb.VERDICT_KILLED)

# name -> (code, expected verdict). Every snippet reports ESCAPED on success.
CASES = {
    "read_etc_shadow": ("""
        try:
            print("ESCAPED", open("/etc/shadow").read()[:20])
        except OSError as e:
            print("denied", type(e).__name__)
        """, OK),
    "read_repository": (f"""
        import os
        for p in [{str(ROOT / 'pyproject.toml')!r}, {str(ROOT)!r}, "/etc/passwd", "/home", "/work", "/var"]:
            try:
                open(p).read() if p.endswith(".toml") else os.listdir(p)
                print("ESCAPED", p)
            except OSError as e:
                print("denied", p, type(e).__name__)
        """, OK),
    "write_outside_work_dir": (f"""
        import os
        for p in ["/usr/escape", "../escape", "/escape", "/proc/escape", "/dev/escape"]:
            try:
                open(p, "w").write("x")
                print("ESCAPED", p)
            except OSError as e:
                print("denied", p, type(e).__name__)
        open({HOST_MARK!r}, "w").write("x")  # lands in the private /tmp, not the host's
        """, OK),
    "socket_to_sandbox_own_port": ("""
        import socket, sys
        port = int(sys.stdin.read())
        for host, p in [("127.0.0.1", port), ("127.0.0.1", 6379), ("8.8.8.8", 53)]:
            s = socket.socket()
            s.settimeout(0.5)
            try:
                s.connect((host, p))
                print("ESCAPED", host, p)
            except OSError as e:
                print("denied", host, p, type(e).__name__)
        """, OK),
    "fork_bomb": ("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """, TIMEOUT_),
    "allocate_10_gb": ("x = bytearray(10 * 1024**3)\nprint('ESCAPED')", MEM),
    "grow_until_oom": ("""
        chunks = []
        while True:
            chunks.append(bytearray(64 * 1024**2))
        """, MEM),
    "infinite_loop": ("while True:\n    pass", TIMEOUT_),
    "infinite_stdout": ("while True:\n    print('spam' * 100)", OUT),
    "infinite_stderr": ("import sys\nwhile True:\n    sys.stderr.write('spam' * 100)", OUT),
    "huge_file": ("open('big', 'wb').write(b'x' * 64 * 1024**2)\nprint('ESCAPED')", OUT),
    "fill_tmp": ("""
        i = 0
        try:
            while i < 1000:
                open(f"/tmp/f{i}", "wb").write(b"x" * 8 * 1024**2)
                i += 1
            print("ESCAPED")
        except OSError as e:
            print("denied", i, type(e).__name__)
        """, OK),
    "kill_the_parent": ("""
        import os, signal
        for pid in [os.getppid(), 1, -1]:
            try:
                os.kill(pid, signal.SIGKILL)
                print("sent", pid)
            except OSError as e:
                print("denied", pid, type(e).__name__)
        print("alive")
        """, None),  # kill(-1) may take this process down too: OK or KILLED, server unharmed
    "sleep_past_deadline": ("import time\ntime.sleep(30)\nprint('ESCAPED')", TIMEOUT_),
    "daemon_outlives_run": ("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.close(1); os.close(2)
                time.sleep(30)
                os._exit(0)
            os._exit(0)
        print("parent done")
        """, OK),
    "raise_rlimits": ("""
        import resource
        for name in ["RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_CPU", "RLIMIT_FSIZE"]:
            r = getattr(resource, name)
            try:
                resource.setrlimit(r, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                print("ESCAPED", name)
            except (ValueError, OSError) as e:
                print("denied", name)
        """, OK),
    "become_root": ("""
        import os
        for f in [lambda: os.setuid(0), lambda: os.setgid(0), lambda: os.setgroups([0]),
                  lambda: os.chroot("/"), lambda: os.sethostname("x") if hasattr(os, "sethostname") else None]:
            try:
                f()
                if os.getuid() == 0:
                    print("ESCAPED")
            except OSError as e:
                print("denied", type(e).__name__)
        print(os.getuid(), os.getgid(), os.getgroups())
        """, OK),
    "mount_and_unshare": ("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"none", b"/sandbox", b"tmpfs", 0, None) == 0:
            print("ESCAPED mount")
        if libc.unshare(0x10000000) == 0:  # CLONE_NEWUSER
            print("ESCAPED unshare")
        if libc.unshare(0x40000000) == 0:  # CLONE_NEWNET
            print("ESCAPED unshare net")
        if libc.syscall(425, 4, ctypes.create_string_buffer(120)) >= 0:  # io_uring_setup
            print("ESCAPED io_uring")
        import os
        pid = os.fork()  # plain fork still works (clone without namespace flags)
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        try:
            import subprocess
            subprocess.run(["unshare", "-U", "true"], check=True, capture_output=True)
            print("ESCAPED unshare tool")
        except (subprocess.CalledProcessError, OSError) as e:
            print("denied", type(e).__name__)
        print("errno", ctypes.get_errno())
        """, OK),
    "symlink_tricks": (f"""
        import os
        os.symlink("/etc/shadow", "shadow")
        os.symlink({str(ROOT)!r}, "repo")
        os.symlink("/", "root")
        for p in ["shadow", "repo/pyproject.toml", "root/etc/shadow", "root/etc"]:
            try:
                open(p).read() if not p.endswith("etc") else os.listdir(p)
                print("ESCAPED", p)
            except OSError as e:
                print("denied", p, type(e).__name__)
        """, OK),
    "proc_peeking": ("""
        import os
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        print("pids", pids)
        if len(pids) > 5:
            print("ESCAPED sees host processes")
        others = ["/proc/1/environ", "/proc/1/root/", "/proc/1/mem"] if os.getpid() != 1 else []
        for p in others + ["/proc/kcore"]:
            try:
                open(p, "rb").read(16) if not p.endswith("/") else os.listdir(p)
                print("ESCAPED", p)
            except OSError as e:
                print("denied", p, type(e).__name__)
        """, OK),
    "read_server_environment": ("""
        import os
        secrets = [k for k in os.environ if "FORGERPC" in k]
        print("ESCAPED" if secrets else "clean", sorted(os.environ))
        """, OK),
    "thread_bomb": ("""
        import threading, time
        n = 0
        try:
            for _ in range(10000):
                threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
                n += 1
            print("ESCAPED", n)
        except RuntimeError:
            print("capped at", n)
        import os, sys; sys.stdout.flush(); os._exit(0)
        """, OK),
    "crash_interpreter": ("import ctypes\nctypes.string_at(0)", KILLED),
}


# Cases that only hold with a given layer on (a weaker tier skips them, saying which layer).
NEEDS = {
    "read_repository": "readonly_host_view", "symlink_tricks": "readonly_host_view",
    "write_outside_work_dir": "readonly_host_view", "fill_tmp": "private_tmp",
    "socket_to_sandbox_own_port": "net_namespace", "proc_peeking": "pid_namespace",
    "mount_and_unshare": "seccomp", "read_etc_shadow": "uid_drop", "become_root": "uid_drop",
    "fork_bomb": "uid_drop", "thread_bomb": "uid_drop", "daemon_outlives_run": "uid_drop",
}


@pytest.mark.parametrize("name", sorted(CASES))
async def test_hostile(sandbox, name):
    code, verdict = CASES[name]
    async with SandboxClient(sandbox[0].address) as client:
        layers = set((await client.execute(code="pass")).isolation_layers)
    if name in NEEDS and NEEDS[name] not in layers:
        pytest.skip(f"layer {NEEDS[name]} is off on this host (install bubblewrap, run as root)")
    stdin = sandbox[0].address.rsplit(":", 1)[1].encode() if name.startswith("socket") else b""
    start = time.monotonic()
    out = await run(sandbox, code, stdin=stdin)
    elapsed = time.monotonic() - start
    text = out.stdout.decode(errors="replace")
    if verdict is not None:
        assert out.verdict == verdict, (pb.Verdict.Name(out.verdict), text[-300:], out.stderr[-500:])
    assert elapsed < TIMEOUT + 5, "the run overstayed its deadline"
    if verdict in (OK,) and name != "thread_bomb":
        assert "denied" in text or "clean" in text or "parent done" in text, text
    if name == "infinite_stdout":
        assert len(out.stdout) == 65536  # capped exactly at max_output_bytes
    if name == "daemon_outlives_run":
        assert out.wall_seconds < TIMEOUT  # the run ended when main exited, not at the deadline
    if name == "become_root":
        uid = int(text.strip().splitlines()[-1].split()[0])
        assert UID_BASE <= uid < UID_BASE + WORKERS  # a slot uid, never 0
    if name == "kill_the_parent":
        assert out.verdict in (OK, KILLED)
    if name == "thread_bomb":
        assert "capped at" in text
    if name in ("infinite_loop", "sleep_past_deadline", "fork_bomb"):
        assert TIMEOUT - 0.1 <= out.wall_seconds < TIMEOUT + 1.0


async def test_isolation_layers_are_reported(sandbox):
    out = await run(sandbox, "print('hi')")
    layers = set(out.isolation_layers)
    assert {"work_dir", "rlimits", "wall_timeout_kill_group", "output_caps"} <= layers
    weaker = os.environ.get("FORGERPC_SANDBOX_ISOLATION", "auto") in ("unshare", "none")
    if os.geteuid() == 0 and not weaker:  # CI runs as root: the strong layers are required
        assert {"uid_drop", "net_namespace", "pid_namespace"} <= layers, layers


async def test_server_survives_the_suite(sandbox):
    # Runs after kill-the-parent and friends (pytest keeps file order for this last test).
    out = await run(sandbox, "print(6 * 7)")
    assert out.verdict == OK and out.stdout == b"42\n"
