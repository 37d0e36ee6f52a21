"""One sandboxed run, start to finish, on a worker thread.

    make work dir (owned by the slot uid) -> spawn the wrapped program in a new session
    -> pump stdin/stdout/stderr with caps until exit or deadline -> kill group if needed
    -> wait4 (exit status + rusage) -> kill anything left under the uid -> delete work dir

Verdict, first rule that matches:
    wall deadline passed                      -> TIMEOUT
    stdout or stderr over the cap             -> OUTPUT_LIMIT
    SIGXCPU, or SIGKILL with cpu >= limit     -> TIMEOUT   (RLIMIT_CPU soft/hard)
    "File too large" (RLIMIT_FSIZE, EFBIG)    -> OUTPUT_LIMIT
    MemoryError / ENOMEM (RLIMIT_AS)          -> MEMORY_LIMIT
    other signal                              -> KILLED
    exit 0 / non-zero                         -> OK / RUNTIME_ERROR
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from forgerpc.services.sandbox import seccomp
from forgerpc.services.sandbox.isolation import Isolation, Limits, tool
from forgerpc.v1 import sandbox_pb2

MAIN = "main.py"
_CHUNK = 65536


@dataclasses.dataclass
class Outcome:
    verdict: int
    exit_code: int
    stdout: bytes
    stderr: bytes
    wall_seconds: float
    cpu_seconds: float
    peak_memory_bytes: int


def _write_files(workdir: str, code: str, files: list[tuple[str, bytes]], uid: int | None) -> None:
    """Writes main.py and the request's files; paths were validated at the edge (relative, no "..")."""
    for rel, content in [(MAIN, code.encode()), *files]:
        path = os.path.join(workdir, rel)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        # O_EXCL|O_NOFOLLOW: the directory is fresh and only we have written to it, so this is
        # belt and braces against a path that names something already there.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
    if uid is not None:
        for dirpath, dirnames, filenames in os.walk(workdir):
            for name in [*dirnames, *filenames]:
                os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)
        os.chown(workdir, uid, uid)
    os.chmod(workdir, 0o700)


def python_flags(site_packages: bool) -> list[str]:
    """Interpreter flags: ignore PYTHON* env vars (-E), user site (-s), no .pyc writes (-B),
    and unless asked no site-packages at all (-S)."""
    return ["-E", "-s", "-B"] + ([] if site_packages else ["-S"])


class _Child:
    """Reaps the wrapped program with wait4, keeping its rusage (Popen.poll would lose it)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.status: int | None = None
        self.usage = None

    def exited(self, block: bool = False) -> bool:
        if self.status is None:
            pid, status, usage = os.wait4(self.proc.pid, 0 if block else os.WNOHANG)
            if pid:
                self.status, self.usage = status, usage
                self.proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen never waits
        return self.status is not None


def _pump(child: _Child, stdin: bytes, cap: int, deadline: float):
    """Feeds stdin and reads both outputs until the program has exited and its outputs are
    drained, a cap is hit or the deadline passes. A pidfd (readable when the program exits)
    wakes the loop at once on exit, even when a leftover descendant holds the pipes open.

    Returns (stdout, stderr, why_stopped) with why_stopped in {None, "timeout", "output"}.
    """
    proc = child.proc
    sel = selectors.DefaultSelector()
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    in_fd, sent = proc.stdin.fileno(), 0
    if stdin:
        os.set_blocking(in_fd, False)
        sel.register(in_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    pidfd = _pidfd(proc.pid)
    if pidfd is not None:
        sel.register(pidfd, selectors.EVENT_READ)
    why, exited = None, False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why = "timeout"
                break
            if not any(fd in bufs for fd in sel.get_map()):  # both outputs closed
                if exited or child.exited():
                    break
                if pidfd is None:
                    time.sleep(min(remaining, 0.002))
                    continue
            # After exit, only drain what is already buffered (timeout 0), then stop.
            events = sel.select(0 if exited else min(remaining, 0.05 if pidfd is None else remaining))
            if not events and (exited or (pidfd is None and child.exited())):
                break
            for key, _ in events:
                fd = key.fd
                if fd == pidfd:
                    sel.unregister(fd)
                    exited = child.exited()
                    continue
                if fd == in_fd:
                    try:
                        sent += os.write(fd, stdin[sent:sent + _CHUNK])
                    except OSError:  # the program closed stdin or exited: stop feeding
                        sent = len(stdin)
                    if sent >= len(stdin):
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                data = os.read(fd, _CHUNK)
                if not data:
                    sel.unregister(fd)
                    continue
                bufs[fd] += data
                if len(bufs[fd]) > cap:
                    del bufs[fd][cap:]
                    why = "output"
            if why:
                break
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), why


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # Linux < 5.3 or Python without it: poll instead
        return None


def _stop(child: _Child, uid: int | None) -> None:
    """Ends a run that is still going. Killing the untrusted processes first (by uid) lets the
    wrappers exit on their own and reap them, so their CPU time still reaches our wait4; the
    process-group kill then covers whatever is left (and is the only tool without a uid)."""
    if uid is not None:
        sweep(uid)
        for _ in range(100):  # up to ~0.2 s for the wrappers to notice and exit
            if child.exited():
                return
            time.sleep(0.002)
    try:
        os.killpg(child.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.exited(block=True)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _home_tasks() -> list[str]:
    """The `tasks` files of this process's own memory and cpuacct groups (to move threads back)."""
    out = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.strip().split(":", 2)
                for c in controllers.split(","):
                    if c in ("memory", "cpuacct"):
                        out[c] = os.path.join(SlotCgroup.ROOT, c, path.lstrip("/"), "tasks")
    except OSError:
        pass
    return [out[c] for c in ("memory", "cpuacct") if c in out]


class SlotCgroup:
    """cgroup-v1 memory + cpuacct groups per worker slot, to measure a run's peak memory and CPU.

    bwrap's outer process does not reap its namespace's init, so wait4's rusage misses the
    untrusted processes; the cgroups count every process of the run. The child joins them
    before anything untrusted runs (see spawning()).
    """

    ROOT = "/sys/fs/cgroup"

    def __init__(self, name: str):
        self.mem = os.path.join(self.ROOT, "memory", name)
        self.cpu = os.path.join(self.ROOT, "cpuacct", name)
        for d in (self.mem, self.cpu):
            os.makedirs(d, exist_ok=True)
        self._tasks = [os.path.join(d, "tasks") for d in (self.mem, self.cpu)]

    @classmethod
    def available(cls) -> bool:
        return os.geteuid() == 0 and len(_HOME_TASKS) == 2 and all(
            os.access(os.path.join(cls.ROOT, c), os.W_OK) for c in ("memory", "cpuacct"))

    def reset(self) -> None:
        for path in (os.path.join(self.mem, "memory.max_usage_in_bytes"),
                     os.path.join(self.cpu, "cpuacct.usage")):
            with open(path, "w") as f:
                f.write("0")

    @contextlib.contextmanager
    def spawning(self):
        """Moves the calling thread into both groups while the block spawns the run, then back.

        cgroup-v1 membership is per thread and a child starts in its parent thread's groups, so
        the wrapped program is inside from its first instruction, with no extra process in the
        chain. (Not a preexec_fn: Python code between fork and exec in a process running gRPC
        threads can deadlock, and it forces fork over vfork.) The spawn's own few hundred
        microseconds of CPU are charged to the run.
        """
        tid = str(threading.get_native_id())
        for path in self._tasks:
            _write(path, tid)
        try:
            yield
        finally:
            for path in _HOME_TASKS:
                _write(path, tid)

    def peak(self) -> int:
        with open(os.path.join(self.mem, "memory.max_usage_in_bytes")) as f:
            return int(f.read())

    def cpu_seconds(self) -> float:
        with open(os.path.join(self.cpu, "cpuacct.usage")) as f:
            return int(f.read()) / 1e9

    def remove(self) -> None:
        for d in (self.mem, self.cpu):
            try:
                os.rmdir(d)
            except OSError:
                pass


_HOME_TASKS = _home_tasks()


def _pids_of(uid: int) -> list[int]:
    """Live (non-zombie) processes owned by `uid`. A zombie is already dead and holds nothing
    but its pid; in tiers without a pid namespace the host's init reaps it."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid and not is_zombie(int(name)):
                    pids.append(int(name))
            except FileNotFoundError:
                pass
    return pids


def is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True  # gone


def sweep(uid: int, rounds: int = 50) -> int:
    """Kills every process still running as `uid` (daemons, setsid escapees). Returns how many."""
    killed = 0
    for _ in range(rounds):
        pids = _pids_of(uid)
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.002)
    # A fork storm refilling faster than we kill: kill(-1) as that uid is atomic in the kernel.
    subprocess.run([tool("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                    "kill", "-s", "KILL", "--", "-1"], timeout=10, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return killed


def _verdict(why: str | None, status: int, tier: str, cpu: float, limits: Limits, stderr: bytes):
    """Maps how the run ended to (verdict, exit_code); see the module docstring."""
    V = sandbox_pb2
    if os.WIFSIGNALED(status):
        sig, code = os.WTERMSIG(status), -os.WTERMSIG(status)
    else:
        code, sig = os.WEXITSTATUS(status), 0
        # bwrap reports a command killed by signal n as exit 128 + n (so does unshare --fork).
        if tier != "none" and 128 < code < 128 + 65:
            sig, code = code - 128, -(code - 128)
    if why == "timeout":
        return V.VERDICT_TIMEOUT, code
    if why == "output":
        return V.VERDICT_OUTPUT_LIMIT, code
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= limits.cpu_seconds - 0.05):
        return V.VERDICT_TIMEOUT, code
    tail = stderr[-2048:]
    if sig == signal.SIGXFSZ or (code != 0 and b"File too large" in tail):
        return V.VERDICT_OUTPUT_LIMIT, code
    if code != 0 and (b"MemoryError" in tail or b"Cannot allocate memory" in tail):
        return V.VERDICT_MEMORY_LIMIT, code
    if sig:
        return V.VERDICT_KILLED, code
    return (V.VERDICT_OK if code == 0 else V.VERDICT_RUNTIME_ERROR), code


def execute(iso: Isolation, work_root: str, uid: int, code: str, stdin: bytes,
            files: list[tuple[str, bytes]], timeout: float, limits: Limits, output_cap: int,
            cgroup: "SlotCgroup | None" = None, site_packages: bool = False) -> Outcome:
    """Runs `code` as main.py in a fresh work dir under `iso`; blocking (call from a thread).

    Peak memory and CPU come from the slot's cgroups when there are some (memory: RSS + page cache
    the run caused). Without them they come from wait4: ru_maxrss then also counts this server's
    RSS at fork (exec records the pre-exec image), an upper bound only, and under bwrap the CPU
    time of the untrusted processes is missed (bwrap does not reap its init).
    """
    workdir = tempfile.mkdtemp(prefix="run-", dir=work_root)
    filter_fd = None
    try:
        _write_files(workdir, code, files, uid if iso.drop_uid else None)
        inside = iso.workdir_inside(workdir)
        program = [iso.python, *python_flags(site_packages), os.path.join(inside, MAIN)]
        filter_fd = seccomp.memfd() if iso.seccomp else None
        argv = iso.command(program, workdir, uid, limits, filter_fd)
        # No LANG: under the C locale Python runs in UTF-8 mode, and the C tools skip locale loading.
        env = {"PATH": "/usr/bin:/bin", "HOME": inside}
        start = time.monotonic()
        if cgroup is not None:
            cgroup.reset()
        with cgroup.spawning() if cgroup is not None else contextlib.nullcontext():
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, cwd=workdir, env=env,
                                    start_new_session=True, close_fds=True,
                                    pass_fds=() if filter_fd is None else (filter_fd,))
        child = _Child(proc)
        try:
            out, err, why = _pump(child, stdin, output_cap, start + timeout)
        finally:
            if not child.exited():
                _stop(child, uid if iso.drop_uid else None)
        status, usage = child.status, child.usage
        wall = time.monotonic() - start
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe and not pipe.closed:
                pipe.close()
        if iso.drop_uid:
            sweep(uid)
        cpu = cgroup.cpu_seconds() if cgroup is not None else usage.ru_utime + usage.ru_stime
        verdict, exit_code = _verdict(why, status, iso.tier, cpu, limits, err)
        return Outcome(verdict=verdict, exit_code=exit_code, stdout=out, stderr=err,
                       wall_seconds=wall, cpu_seconds=cpu,
                       peak_memory_bytes=cgroup.peak() if cgroup is not None else usage.ru_maxrss * 1024)
    finally:
        if filter_fd is not None:
            os.close(filter_fd)
        shutil.rmtree(workdir, ignore_errors=True)
