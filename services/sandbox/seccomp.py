"""A small seccomp-BPF filter (x86_64) handed to bwrap with `--seccomp FD`.

The namespaces and the uid already contain a run; this filter shrinks the kernel surface it can
reach. It answers EPERM to syscalls no test program needs and that widen that surface:

    new namespaces (unshare, setns, clone/clone3 with CLONE_NEWUSER), mounts, ptrace, keyrings,
    bpf, perf, userfaultfd, io_uring, module and kexec loading, swap, reboot, chroot, file handles

and to every x32-ABI syscall (nr >= 0x40000000). clone3 answers ENOSYS so that libc falls back
to clone, whose flags a classic BPF filter can inspect. Program layout (struct sock_filter,
8 bytes each: u16 code, u8 jt, u8 jf, u32 k):

    if arch != x86_64: allow            (other ABIs are not filtered; the layer is then off)
    if nr >= 0x40000000: EPERM
    for each blocked nr: if nr == n: EPERM
    if nr == clone3: ENOSYS
    if nr == clone and args[0] & CLONE_NEWUSER: EPERM
    allow
"""

from __future__ import annotations

import os
import platform
import struct

_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_AUDIT_ARCH_X86_64 = 0xC000003E
_EPERM, _ENOSYS = 1, 38
_CLONE, _CLONE3, _CLONE_NEWUSER = 56, 435, 0x10000000

# x86_64 numbers: ptrace, chroot, pivot_root, mount, umount2, swapon, swapoff, reboot,
# init/delete/finit_module, kexec_load/kexec_file_load, add_key, request_key, keyctl, unshare,
# perf_event_open, name_to_handle_at, open_by_handle_at, setns, bpf, userfaultfd,
# open_tree, move_mount, fsopen, fsconfig, fsmount, fspick, mount_setattr,
# io_uring_setup/enter/register (a large, often-exploited surface no test program needs).
BLOCKED = (101, 161, 155, 165, 166, 167, 168, 169, 175, 176, 313, 246, 320, 248, 249, 250, 272,
           298, 303, 304, 308, 321, 323, 428, 429, 430, 431, 432, 433, 442, 425, 426, 427)


def supported() -> bool:
    return platform.machine() == "x86_64"


def program() -> bytes:
    """The filter as bytes of struct sock_filter, as `bwrap --seccomp` reads it."""
    ins: list[tuple[int, int, int, int]] = []
    # Jump offsets are relative to the next instruction; the tail is [EPERM, ENOSYS, ALLOW].
    n_body = 4 + len(BLOCKED) + 1 + 3  # instructions before the tail
    def to_tail(i: int, which: int) -> int:  # which: 0 EPERM, 1 ENOSYS, 2 ALLOW
        return n_body - (i + 1) + which
    ins.append((_LD_W_ABS, 0, 0, 4))  # arch
    ins.append((_JEQ, 0, to_tail(1, 2), _AUDIT_ARCH_X86_64))
    ins.append((_LD_W_ABS, 0, 0, 0))  # nr
    ins.append((_JGE, to_tail(3, 0), 0, 0x40000000))
    for nr in BLOCKED:
        ins.append((_JEQ, to_tail(len(ins), 0), 0, nr))
    ins.append((_JEQ, to_tail(len(ins), 1), 0, _CLONE3))
    ins.append((_JEQ, 0, to_tail(len(ins), 2), _CLONE))
    ins.append((_LD_W_ABS, 0, 0, 16))  # args[0], low 32 bits (little endian)
    ins.append((_JSET, to_tail(len(ins), 0), to_tail(len(ins), 2), _CLONE_NEWUSER))
    assert len(ins) == n_body
    ins += [(_RET, 0, 0, _ERRNO | _EPERM), (_RET, 0, 0, _ERRNO | _ENOSYS), (_RET, 0, 0, _ALLOW)]
    return b"".join(struct.pack("<HBBI", *i) for i in ins)


def memfd() -> int:
    """A fresh fd holding the program at offset 0 (bwrap reads it to EOF); caller closes it."""
    fd = os.memfd_create("forgerpc-seccomp", 0)
    os.write(fd, program())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
