"""A small seccomp deny-list for sandboxes, as a raw classic-BPF program for ``bwrap --seccomp``.

The sandbox has no capabilities and cannot create user namespaces, so most dangerous syscalls
already fail. This filter removes kernel surface that is reachable without privileges and is not
namespaced or is a frequent source of exploits: the kernel keyring (shared by the whole host),
eBPF, perf events, userfaultfd, io_uring, cross-process memory access, and the module, kexec,
clock and swap calls. Denied calls fail with EPERM, so programs that probe for them (libuv tries
io_uring first; CRIU cannot checkpoint an io_uring, so the gateway must fall back to epoll) fall
back cleanly. Syscalls of other ABIs (x32, i386) are denied outright.

The sandbox runs in the host's user namespace (as its own unprivileged uid), so the filter also
refuses new user namespaces: ``clone`` and ``unshare`` with ``CLONE_NEWUSER`` fail with EPERM, and
``clone3``, whose flags sit in memory a filter cannot read, fails with ENOSYS, on which the C
library falls back to ``clone``.

The gateway gets the filter from ``bwrap --seccomp``; a command the backend runs inside a running
sandbox (``exec``) gets the same one from ``under_filter``, installed before it enters the
sandbox's namespaces, so no process in a sandbox runs without it.

Only x86_64 is supported. ``seccomp_program()`` returns None elsewhere and the sandbox runs
without the filter.
"""

from __future__ import annotations

import errno
import platform
import struct
import sys
from pathlib import Path

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

# x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
DENIED_X86_64 = {
    "uselib": 134,
    "ustat": 136,
    "sysfs": 139,
    "_sysctl": 156,
    "adjtimex": 159,
    "acct": 163,
    "settimeofday": 164,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "iopl": 172,
    "ioperm": 173,
    "init_module": 175,
    "delete_module": 176,
    "quotactl": 179,
    "lookup_dcookie": 212,
    "clock_settime": 227,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "perf_event_open": 298,
    "fanotify_init": 300,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "clock_adjtime": 305,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
}

# Calls refused only with CLONE_NEWUSER among their flags (first argument), and clone3.
CLONE_NEWUSER = 0x10000000
NEWUSER_FLAG_CALLS = {"clone": 56, "unshare": 272}
CLONE3 = 435

_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_RET_ALLOW = 0x7FFF0000
_RET_EPERM = 0x00050000 | errno.EPERM
_RET_ENOSYS = 0x00050000 | errno.ENOSYS
_NR_OFFSET = 0  # struct seccomp_data: int nr; __u32 arch; __u64 ip; __u64 args[6]
_ARCH_OFFSET = 4
_ARG0_LOW_OFFSET = 16  # little endian: the low 32 bits of args[0]


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def seccomp_program() -> bytes | None:
    """Return the filter as ``struct sock_filter`` records, or None on an unsupported machine."""
    if platform.machine() != "x86_64":
        return None
    denied = sorted(DENIED_X86_64.values())
    program = [
        _insn(_LD_W_ABS, 0, 0, _ARCH_OFFSET),
        _insn(_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),  # not x86_64 (e.g. i386 via int 0x80): deny
        _insn(_RET_K, 0, 0, _RET_EPERM),
        _insn(_LD_W_ABS, 0, 0, _NR_OFFSET),
        _insn(_JGE_K, 0, 1, X32_SYSCALL_BIT),  # x32 ABI: deny
        _insn(_RET_K, 0, 0, _RET_EPERM),
        _insn(_JEQ_K, 0, 1, CLONE3),
        _insn(_RET_K, 0, 0, _RET_ENOSYS),
    ]
    for number in NEWUSER_FLAG_CALLS.values():
        # nr matches: load the flags, deny if CLONE_NEWUSER is set, else reload nr and go on.
        program += [
            _insn(_JEQ_K, 0, 4, number),
            _insn(_LD_W_ABS, 0, 0, _ARG0_LOW_OFFSET),
            _insn(_JSET_K, 0, 1, CLONE_NEWUSER),
            _insn(_RET_K, 0, 0, _RET_EPERM),
            _insn(_LD_W_ABS, 0, 0, _NR_OFFSET),
        ]
    for index, number in enumerate(denied):
        # On a match, jump over the remaining checks and the final ALLOW to the EPERM return.
        remaining = len(denied) - index - 1
        program.append(_insn(_JEQ_K, remaining + 1, 0, number))
    program += [_insn(_RET_K, 0, 0, _RET_ALLOW), _insn(_RET_K, 0, 0, _RET_EPERM)]
    return b"".join(program)


# Install the filter in $1 (after no_new_privs), then exec $2... . Runs as root on the host.
_INSTALL_AND_EXEC = r"""
import ctypes, os, sys
program = open(sys.argv[1], "rb").read()
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
prog = Prog(len(program) // 8, program)
libc = ctypes.CDLL(None, use_errno=True)
ulong = ctypes.c_ulong
libc.prctl.argtypes = [ctypes.c_int, ulong, ctypes.c_void_p, ulong, ulong]
# PR_SET_NO_NEW_PRIVS = 38, PR_SET_SECCOMP = 22, SECCOMP_MODE_FILTER = 2
if libc.prctl(38, 1, None, 0, 0) or libc.prctl(22, 2, ctypes.addressof(prog), 0, 0):
    sys.exit("cannot install the seccomp filter: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[2], sys.argv[2:])
"""


def under_filter(program_file: Path, argv: list[str]) -> list[str]:
    """Return an argv that runs ``argv`` (absolute program path) under the filter in the file."""
    return [sys.executable, "-c", _INSTALL_AND_EXEC, str(program_file), *argv]
