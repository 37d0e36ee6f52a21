"""Isolation tiers: how one untrusted command line is wrapped, and which layers that gives.

Every run, whatever the tier, gets: a fresh work directory, rlimits (via util-linux `prlimit`), a
new session whose process group is killed at the wall-clock deadline, output caps and a sweep
that kills any process left under the run's uid. On top of that:

| tier    | wrapper                               | adds                                                    |
|---------|---------------------------------------|---------------------------------------------------------|
| bwrap   | bubblewrap (root, no user namespace)  | net/pid/ipc/uts/mount namespaces, a read-only view of   |
|         |                                       | only /usr and the interpreter, private /proc and /tmp   |
| unshare | util-linux `unshare` (root)           | net/pid/ipc/uts namespaces, private /proc; host fs      |
|         |                                       | still visible (file permissions are the only guard)     |
| none    | -                                     | nothing; only for hosts where namespaces are refused    |

As root every tier then drops to an unprivileged uid with `setpriv` (no groups, no capabilities,
no_new_privs), so the kernel's permission checks apply to the untrusted code. In the bwrap tier
on x86_64 a seccomp filter (seccomp.py) also refuses namespace, mount, ptrace, bpf and similar
syscalls. `isolation_layers` in each response says what was on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys

from forgerpc.services.sandbox import seccomp

log = logging.getLogger("forgerpc.sandbox")

# Inside the bwrap tier the work directory always appears here.
SANDBOX_DIR = "/sandbox"
_TIERS = ("bwrap", "unshare", "none")
# System tools only (not a shim earlier on PATH): the bwrap tier sees only /usr inside.
_SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"


def tool(name: str) -> str:
    """Absolute path of a system tool (saves a PATH walk per exec), or the bare name."""
    return shutil.which(name, path=_SYSTEM_PATH) or name


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-run limits, already clamped by the server."""

    cpu_seconds: int
    memory_bytes: int
    processes: int
    file_bytes: int
    open_files: int
    tmp_bytes: int


@dataclasses.dataclass(frozen=True)
class Isolation:
    """A chosen tier plus the facts needed to build command lines for it.

    Attributes:
        tier: "bwrap", "unshare" or "none".
        python: the interpreter the sandbox runs (a real file, not a venv shim).
        layers: names of the isolation layers every run in this tier gets.
    """

    tier: str
    python: str
    layers: tuple[str, ...]
    drop_uid: bool
    seccomp: bool = False  # pass a filter fd to command() (bwrap tier, x86_64)

    def workdir_inside(self, workdir: str) -> str:
        return SANDBOX_DIR if self.tier == "bwrap" else workdir

    def command(self, program: list[str], workdir: str, uid: int, limits: Limits,
                seccomp_fd: int | None = None) -> list[str]:
        """Wraps `program` (argv run in the work dir) in this tier's isolation.

        `seccomp_fd` (bwrap tier) is an fd holding seccomp.program(); pass it to the child."""
        inner = [
            tool("prlimit"), f"--as={limits.memory_bytes}",
            # Soft limit -> SIGXCPU, hard limit one second later -> SIGKILL.
            f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}",
            f"--nproc={limits.processes}", f"--fsize={limits.file_bytes}",
            f"--nofile={limits.open_files}", "--core=0", "--",
        ]
        if self.drop_uid:
            inner += [tool("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                      "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
        inner += program
        if self.tier == "bwrap":
            extra = ["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []
            return _bwrap_prefix(self.python, workdir, limits, self.drop_uid, extra) + inner
        if self.tier == "unshare":
            return [tool("unshare"), "--net", "--ipc", "--uts", "--pid", "--fork", "--kill-child",
                    "--mount-proc", "--"] + inner
        return inner


def _bwrap_prefix(python: str, workdir: str, limits: Limits, as_root: bool,
                  extra: list[str]) -> list[str]:
    args = [tool("bwrap"), *extra, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if not as_root:  # an unprivileged server needs a user namespace to make the others
        args.append("--unshare-user")
    # Read-only view of only what an interpreter needs: /usr (merged-usr symlinks kept as
    # symlinks) and the interpreter's own prefix. No /etc, /home, /root, /work, /var.
    args += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/lib", "/lib64", "/sbin"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = os.path.dirname(os.path.dirname(python))
    if not prefix.startswith("/usr/") and prefix != "/usr":
        args += ["--ro-bind", prefix, prefix]
    args += ["--proc", "/proc", "--dev", "/dev", "--bind", workdir, SANDBOX_DIR,
             "--chdir", SANDBOX_DIR, "--perms", "1777", "--size", str(limits.tmp_bytes),
             "--tmpfs", "/tmp", "--clearenv", "--setenv", "HOME", SANDBOX_DIR,
             "--setenv", "PATH", "/usr/bin:/bin", "--"]  # no LANG: python's UTF-8 mode covers C
    return args


def default_python() -> str:
    """The real interpreter file behind this process (resolving venv symlinks)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _reachable_by_others(path: str) -> bool:
    """True when a uid with no groups can execute `path` (o+x on it and every parent dir)."""
    path = os.path.realpath(path)
    if not os.path.isfile(path):
        return False
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        if not os.stat("/".join(parts[:i]) or "/").st_mode & 0o001:
            return False
    return True


def _layers(tier: str, drop_uid: bool, seccomp_on: bool) -> tuple[str, ...]:
    layers = ["work_dir", "rlimits", "wall_timeout_kill_group", "output_caps", "uid_sweep"]
    if drop_uid:
        layers += ["uid_drop", "no_new_privs", "no_capabilities"]
    if tier in ("bwrap", "unshare"):
        layers += ["net_namespace", "pid_namespace", "ipc_namespace", "uts_namespace", "private_proc"]
    if tier == "bwrap":
        layers += ["mount_namespace", "readonly_host_view", "private_tmp"]
    if seccomp_on:
        layers.append("seccomp")
    return tuple(layers)


def _probe(iso: Isolation, work_root: str) -> str | None:
    """Runs a tiny program through the tier; None when it works, else why not."""
    probe_dir = os.path.join(work_root, "probe")
    os.makedirs(probe_dir, exist_ok=True)
    uid = 65534
    if iso.drop_uid:
        os.chown(probe_dir, uid, uid)
    limits = Limits(cpu_seconds=5, memory_bytes=512 * 1024 * 1024, processes=16,
                    file_bytes=1 << 20, open_files=64, tmp_bytes=1 << 20)
    # A file in the work dir, as real runs have: this also catches a work_root whose parents
    # the unprivileged uid cannot traverse (only the bwrap tier binds it elsewhere).
    with open(os.path.join(probe_dir, "probe.py"), "w") as f:
        f.write("import os; print(os.getuid())\n")
    if iso.drop_uid:
        os.chown(os.path.join(probe_dir, "probe.py"), uid, uid)
    fd = seccomp.memfd() if iso.seccomp else None
    argv = iso.command([iso.python, "-E", "-s", "-S", os.path.join(iso.workdir_inside(probe_dir), "probe.py")],
                       probe_dir, uid, limits, fd)
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=probe_dir,
                             env={"PATH": "/usr/bin:/bin"}, pass_fds=() if fd is None else (fd,))
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
        if fd is not None:
            os.close(fd)
    if out.returncode != 0:
        return (out.stderr.strip() or f"exit {out.returncode}")[-300:]
    if iso.drop_uid and out.stdout.strip() != str(uid):
        return f"ran as uid {out.stdout.strip()}, expected {uid}"
    return None


def detect(wanted: str, python: str, work_root: str) -> Isolation:
    """Picks the tier: `wanted` exactly (RuntimeError if unavailable) or, for "auto", the
    strongest tier whose probe succeeds. Logs which layers are on and which are not."""
    root = os.geteuid() == 0
    drop_uid = root and shutil.which("setpriv", path=_SYSTEM_PATH) is not None
    if not root:
        log.warning("sandbox: not running as root, so runs keep this uid (layer uid_drop off)")
    candidates = _TIERS if wanted == "auto" else (wanted,)
    reasons = []
    for tier in candidates:
        if tier in ("bwrap", "unshare") and shutil.which(tier, path=_SYSTEM_PATH) is None:
            reasons.append(f"{tier}: not installed")
            continue
        if tier == "unshare" and not root:
            reasons.append("unshare: needs root")
            continue
        py = python
        if tier != "bwrap" and drop_uid and not _reachable_by_others(py):
            # e.g. a pyenv interpreter under /root (mode 700): only bwrap can bind it in.
            py = "/usr/bin/python3" if _reachable_by_others("/usr/bin/python3") else py
        iso = Isolation(tier=tier, python=py, layers=_layers(tier, drop_uid, False), drop_uid=drop_uid)
        if tier == "bwrap" and seccomp.supported():
            with_filter = dataclasses.replace(iso, seccomp=True, layers=_layers(tier, drop_uid, True))
            why = _probe(with_filter, work_root)
            if why is None:
                iso = with_filter
            else:
                log.warning("sandbox: seccomp filter refused (%s); layer seccomp off", why)
        why = _probe(iso, work_root)
        if why is None:
            for r in reasons:
                log.warning("sandbox: tier %s", r)
            log.info("sandbox: isolation tier %s; layers on: %s", tier, ", ".join(iso.layers))
            return iso
        reasons.append(f"{tier}: {why}")
    raise RuntimeError("sandbox: no usable isolation tier: " + "; ".join(reasons))
