"""A seccomp filter for the code sandbox, compiled to classic BPF here (no libseccomp).

bubblewrap installs it (`--seccomp FD`) on the sandboxed program after building the sandbox.
The filter denies, with EPERM, the system calls that widen the kernel's attack surface or reach
outside the namespaces: io_uring, the kernel keyring, ptrace and cross-process memory access,
namespace and mount manipulation, BPF and perf events, module and kexec loading, handles that
bypass path lookup. `clone3` gets ENOSYS so that libc falls back to `clone`, whose flags the
namespace rules already restrict. A call made with another architecture's convention (i386 via
`int 0x80` on x86_64, or the x32 ABI) kills the process: its numbers would bypass the table.
"""
import errno
import platform
import struct

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
_NR_OFFSET, _ARCH_OFFSET = 0, 4
# Classic BPF opcodes (linux/bpf_common.h).
_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x05 | 0x30 | 0x00  # BPF_JMP | BPF_JGE | BPF_K
_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
# Filter return values (linux/seccomp.h).
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
_X32_SYSCALL_BIT = 0x40000000

DENIED = ("io_uring_setup", "io_uring_enter", "io_uring_register", "keyctl", "add_key",
          "request_key", "ptrace", "process_vm_readv", "process_vm_writev", "unshare", "setns",
          "mount", "umount2", "pivot_root", "open_tree", "move_mount", "fsopen", "fsconfig",
          "fsmount", "fspick", "mount_setattr", "bpf", "perf_event_open", "userfaultfd",
          "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
          "open_by_handle_at", "name_to_handle_at", "swapon", "swapoff", "reboot", "syslog",
          "acct", "quotactl", "quotactl_fd", "fanotify_init", "lookup_dcookie")
_ENOSYS = ("clone3",)

# (AUDIT_ARCH_* value, syscall numbers) per machine; numbers from the kernel's unistd tables.
_ARCHES = {
    "x86_64": (0xC000003E, dict(
        ptrace=101, syslog=103, pivot_root=155, acct=163, mount=165, umount2=166, swapon=167,
        swapoff=168, reboot=169, init_module=175, delete_module=176, quotactl=179,
        lookup_dcookie=212, kexec_load=246, add_key=248, request_key=249, keyctl=250,
        unshare=272, perf_event_open=298, fanotify_init=300, name_to_handle_at=303,
        open_by_handle_at=304, setns=308, process_vm_readv=310, process_vm_writev=311,
        finit_module=313, kexec_file_load=320, bpf=321, userfaultfd=323, io_uring_setup=425,
        io_uring_enter=426, io_uring_register=427, open_tree=428, move_mount=429, fsopen=430,
        fsconfig=431, fsmount=432, fspick=433, clone3=435, mount_setattr=442,
        quotactl_fd=443)),
    "aarch64": (0xC00000B7, dict(
        lookup_dcookie=18, umount2=39, mount=40, pivot_root=41, quotactl=60, acct=89,
        unshare=97, kexec_load=104, init_module=105, delete_module=106, syslog=116, ptrace=117,
        reboot=142, add_key=217, request_key=218, keyctl=219, swapon=224, swapoff=225,
        perf_event_open=241, fanotify_init=262, name_to_handle_at=264, open_by_handle_at=265,
        setns=268, process_vm_readv=270, process_vm_writev=271, finit_module=273, bpf=280,
        userfaultfd=282, kexec_file_load=294, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, open_tree=428, move_mount=429, fsopen=430, fsconfig=431,
        fsmount=432, fspick=433, clone3=435, mount_setattr=442, quotactl_fd=443)),
}


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
  """One struct sock_filter {u16 code; u8 jt; u8 jf; u32 k} in native byte order."""
  return struct.pack("=HBBI", code, jt, jf, k)


def filter_program(machine: str | None = None) -> bytes:
  """The compiled filter for `machine` (default: this one), as bwrap's --seccomp expects."""
  machine = machine or platform.machine()
  if machine not in _ARCHES:
    raise RuntimeError(f"no seccomp syscall table for machine {machine!r} "
                       f"(have {sorted(_ARCHES)})")
  audit_arch, numbers = _ARCHES[machine]
  program = [_insn(_LD_W_ABS, _ARCH_OFFSET),
             _insn(_JEQ_K, audit_arch, jt=1),
             _insn(_RET_K, _RET_KILL_PROCESS),
             _insn(_LD_W_ABS, _NR_OFFSET)]
  if machine == "x86_64":
    program += [_insn(_JGE_K, _X32_SYSCALL_BIT, jf=1), _insn(_RET_K, _RET_KILL_PROCESS)]
  rules = [(name, errno.EPERM) for name in DENIED] + [(name, errno.ENOSYS) for name in _ENOSYS]
  for name, error in rules:
    program += [_insn(_JEQ_K, numbers[name], jf=1), _insn(_RET_K, _RET_ERRNO | error)]
  program.append(_insn(_RET_K, _RET_ALLOW))
  return b"".join(program)
