"""Run one untrusted Python program under OS-level isolation (the code reward's sandbox).

Layers, outermost first:
- When we are root, the program runs as a dedicated unprivileged uid (one per concurrent run):
  root ignores RLIMIT_NPROC, so only this makes the process limit (fork bombs) real, and it lets
  the parent kill every process the run left behind, wherever it went.
- bubblewrap: new user/pid/net/ipc/uts namespaces (no network; the program is pid 1 of its pid
  namespace, so every process dies with it and /proc shows no host process or command line),
  read-only /usr, size-capped tmpfs for the working directory, /tmp and /dev/shm, the program
  copied in (no host path in /proc/self/mountinfo), nothing else of the host visible, and a
  seccomp filter (`_seccomp`: no io_uring, keyring, ptrace, namespace or mount calls...).
  Without working bubblewrap runs are refused unless the caller opts in (`allow_unsandboxed`
  or KIMI_ALLOW_UNSANDBOXED=1): the program then shares the host's network and sees its
  filesystem (as the unprivileged uid when root).
- rlimits set by prlimit(1) before bubblewrap starts: CPU seconds, address space, processes and
  threads, file size (stdout included), open files, no core files.
- A new session; SIGKILL to the whole process group on timeout and after exit; a clean
  environment (no variable of the parent reaches the program); stdin/stdout/stderr are unlinked
  temporary files, so no pipe can block and output size is bounded by the file-size limit.

"reliability_guard"-style monkeypatching inside the interpreter is never relied on.
"""
import dataclasses
import functools
import importlib.util
import math
import os
import queue
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import warnings

from kimi_jax.rewards import _seccomp

_SANDBOX_DIR = "/sandbox"  # the program's working directory inside bubblewrap
_PACKAGES_DIR = "/opt/pylib"  # read-only python packages inside bubblewrap
_PROGRAM = "main.py"
_PYTHON_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3")
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64")
# Dedicated uids: _UID_BASE + (our pid % _UID_PROCESSES) * MAX_CONCURRENT_RUNS + slot, so two
# trainers (or pytest workers) on one machine almost never share one.
MAX_CONCURRENT_RUNS = 64
_UID_BASE = 200_000
_UID_PROCESSES = 4096
_BWRAP_PROCESSES = 1  # bubblewrap's monitor counts against the limit (the program is pid 1)
_STDERR_TAIL_BYTES = 4096
_KILL_SWEEP_S = 10.0
UNSANDBOXED_ENV = "KIMI_ALLOW_UNSANDBOXED"


class SandboxUnavailable(RuntimeError):
  """Full isolation does not work here and the caller did not opt out of it."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-run resource limits."""
  timeout_s: float = 2.0  # wall clock; CPU time is capped at ceil(timeout_s) + 1 s as a backstop
  memory_mb: int = 256  # address space of each process
  max_processes: int = 16  # processes and threads the program may run at once
  max_output_mb: int = 16  # largest file it may write, stdout included
  disk_mb: int = 64  # size of each writable tmpfs (working dir, /tmp, /dev/shm) under bwrap
  max_open_files: int = 64  # file descriptors per process (RLIMIT_NOFILE)

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not value > 0:
        raise ValueError(f"Limits.{field.name} must be > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Execution:
  """What one run did. `stdout` is only meaningful when `ok`."""
  timed_out: bool
  output_limited: bool  # stdout reached Limits.max_output_mb
  returncode: int | None  # None when timed out
  stdout: str
  stderr_tail: str
  wall_s: float

  @property
  def ok(self) -> bool:
    return not self.timed_out and not self.output_limited and self.returncode == 0


@dataclasses.dataclass(frozen=True)
class Isolation:
  """How this machine runs programs (probed once per process)."""
  bwrap: bool  # namespaces, no network, read-only host view, seccomp filter
  dedicated_uid: bool  # we are root and drop to a per-run unprivileged uid
  missing: str = ""  # why bwrap is False


_slots: queue.SimpleQueue = queue.SimpleQueue()
for _slot in range(MAX_CONCURRENT_RUNS):
  _slots.put(_slot)


def python_interpreter() -> str:
  """The system interpreter: an unprivileged uid can run it and bubblewrap shows /usr."""
  for path in _PYTHON_CANDIDATES:
    if os.access(path, os.X_OK):
      return path
  raise RuntimeError(f"no system python found at any of {_PYTHON_CANDIDATES}")


def sandbox_uid(slot: int) -> int:
  """The unprivileged uid (and gid) of run slot `slot` in this process."""
  return _UID_BASE + (os.getpid() % _UID_PROCESSES) * MAX_CONCURRENT_RUNS + slot


def sandbox_uids() -> range:
  """Every uid this process's runs may use (for leak checks)."""
  return range(sandbox_uid(0), sandbox_uid(MAX_CONCURRENT_RUNS))


def _live_processes(uid: int) -> list[tuple[int, int]]:
  """(pid, threads) of every non-zombie process whose real uid is `uid`."""
  found = []
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
      continue
    if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
      found.append((int(name), int(fields["Threads"])))
  return found


def _kill_all_of(uid: int) -> None:
  """SIGKILL every process of `uid` until none is left (a fork bomb may race the first pass)."""
  deadline = time.monotonic() + _KILL_SWEEP_S
  while processes := _live_processes(uid):
    if time.monotonic() > deadline:
      raise RuntimeError(f"sandbox uid {uid} still has processes {processes} after "
                         f"{_KILL_SWEEP_S} s of SIGKILL")
    for pid, _ in processes:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    time.sleep(0.001)


def _process_limit(limits: Limits, dedicated_uid: bool, bwrap: bool) -> int:
  """RLIMIT_NPROC counts all tasks of the real uid: on a shared uid add what already runs."""
  base = _BWRAP_PROCESSES if bwrap else 0
  if not dedicated_uid:
    base += sum(threads for _, threads in _live_processes(os.getuid()))
  return base + limits.max_processes


def _prlimit_argv(limits: Limits, nproc: int) -> list[str]:
  memory = limits.memory_mb * 2**20
  output = limits.max_output_mb * 2**20
  cpu = math.ceil(limits.timeout_s) + 1
  return ["prlimit", f"--cpu={cpu}", f"--as={memory}", f"--nproc={nproc}",
          f"--fsize={output}", f"--nofile={limits.max_open_files}", "--core=0", "--"]


def _bwrap_argv(limits: Limits, program_fd: int, seccomp_fd: int, packages: dict[str, str],
                python: str) -> list[str]:
  disk = str(limits.disk_mb * 2**20)
  argv = ["bwrap", "--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net",
          "--unshare-uts", "--unshare-cgroup-try", "--disable-userns", "--die-with-parent",
          "--new-session", "--as-pid-1", "--seccomp", str(seccomp_fd), "--proc", "/proc",
          "--dev", "/dev"]
  for path in _SYSTEM_DIRS:
    if os.path.islink(path):
      argv += ["--symlink", os.readlink(path), path]
    elif os.path.isdir(path):
      argv += ["--ro-bind", path, path]
  prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))
  if not any(prefix == d or prefix.startswith(d + "/") for d in _SYSTEM_DIRS):
    argv += ["--ro-bind", prefix, prefix]
  for writable in ("/tmp", "/dev/shm", _SANDBOX_DIR):
    argv += ["--size", disk, "--tmpfs", writable]
  argv += ["--ro-bind-data", str(program_fd), f"{_SANDBOX_DIR}/{_PROGRAM}"]
  for name, path in packages.items():
    argv += ["--ro-bind", path, f"{_PACKAGES_DIR}/{name}"]
  return argv + ["--chdir", _SANDBOX_DIR, "--"]


@functools.cache
def _package_dirs(names: tuple[str, ...]) -> dict[str, str]:
  """Directory of each importable top-level package, found without importing it."""
  dirs = {}
  for name in names:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
      raise ValueError(f"python_packages: {name!r} is not an installed package directory")
    dirs[name] = list(spec.submodule_search_locations)[0]
  return dirs


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
  """Wait for exit without reaping (the group id stays valid for killpg); True if it exited."""
  pidfd = os.pidfd_open(proc.pid)
  try:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))
  finally:
    os.close(pidfd)


def _read_text(f, limit: int, tail: bool = False) -> str:
  size = f.seek(0, os.SEEK_END)
  f.seek(max(0, size - limit) if tail else 0)
  return f.read(limit).decode("utf-8", errors="replace")


def _launch(source: str, stdin: str, limits: Limits, packages: tuple[str, ...], bwrap: bool,
            slot: int) -> Execution:
  uid = sandbox_uid(slot) if os.geteuid() == 0 else None
  package_dirs = _package_dirs(packages)
  python = python_interpreter()
  with tempfile.TemporaryDirectory(prefix="kimi_sandbox_") as run_dir, \
       tempfile.TemporaryFile() as stdin_f, tempfile.TemporaryFile() as stdout_f, \
       tempfile.TemporaryFile() as stderr_f, tempfile.TemporaryFile() as program_f, \
       tempfile.TemporaryFile() as seccomp_f:
    stdin_f.write(stdin.encode())
    stdin_f.seek(0)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    pass_fds = ()
    if bwrap:
      for f, data in ((program_f, source.encode()), (seccomp_f, _seccomp.filter_program())):
        f.write(data)
        f.flush()
        f.seek(0)
      pass_fds = (program_f.fileno(), seccomp_f.fileno())
      sandbox_argv = _bwrap_argv(limits, *pass_fds, package_dirs, python)
      env["HOME"] = _SANDBOX_DIR
      packages_dir = _PACKAGES_DIR
    else:
      program_path = os.path.join(run_dir, _PROGRAM)
      with open(program_path, "w") as f:
        f.write(source)
      os.chmod(program_path, 0o444)
      sandbox_argv = []
      env["HOME"] = run_dir
      packages_dir = os.path.join(run_dir, ".pylib")
      os.mkdir(packages_dir)
      for name, path in package_dirs.items():
        os.symlink(path, os.path.join(packages_dir, name))
    if packages:
      env["PYTHONPATH"] = packages_dir
    if uid is not None:
      os.chown(run_dir, uid, uid)
    nproc = _process_limit(limits, dedicated_uid=uid is not None, bwrap=bwrap)
    argv = _prlimit_argv(limits, nproc) + sandbox_argv + [python, "-s", "-B", _PROGRAM]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=stdin_f, stdout=stdout_f, stderr=stderr_f, cwd=run_dir,
                            env=env, user=uid, group=uid, pass_fds=pass_fds,
                            extra_groups=None if uid is None else [], start_new_session=True)
    try:
      exited = _wait(proc, limits.timeout_s)
    finally:
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      proc.wait()
      # Even under bubblewrap: its monitor may exit before the pid namespace is torn down.
      if uid is not None:
        _kill_all_of(uid)
    wall_s = time.monotonic() - start
    output_bytes = limits.max_output_mb * 2**20
    return Execution(timed_out=not exited,
                     output_limited=stdout_f.seek(0, os.SEEK_END) >= output_bytes,
                     returncode=proc.returncode if exited else None,
                     stdout=_read_text(stdout_f, output_bytes),
                     stderr_tail=_read_text(stderr_f, _STDERR_TAIL_BYTES, tail=True),
                     wall_s=wall_s)


_isolation: Isolation | None = None
_isolation_lock = threading.Lock()


def _probe_isolation() -> Isolation:
  if shutil.which("prlimit") is None:
    raise RuntimeError("the code sandbox needs prlimit(1) (util-linux) on PATH")
  dedicated_uid = os.geteuid() == 0
  try:
    _seccomp.filter_program()
  except RuntimeError as error:
    return Isolation(bwrap=False, dedicated_uid=dedicated_uid, missing=str(error))
  if shutil.which("bwrap") is None:
    reason = "bubblewrap (bwrap) is not installed"
  else:
    slot = _slots.get()
    try:
      probe = _launch("print(6 * 7)", "", Limits(), (), bwrap=True, slot=slot)
    finally:
      _slots.put(slot)
    if probe.ok and probe.stdout == "42\n":
      return Isolation(bwrap=True, dedicated_uid=dedicated_uid)
    reason = f"bubblewrap cannot build its sandbox here ({probe.stderr_tail.strip()!r})"
  return Isolation(bwrap=False, dedicated_uid=dedicated_uid, missing=reason)


def isolation() -> Isolation:
  """How programs run on this machine; the first call probes bubblewrap."""
  global _isolation
  with _isolation_lock:
    if _isolation is None:
      _isolation = _probe_isolation()
    return _isolation


def _unsandboxed_allowed(allow_unsandboxed: bool) -> bool:
  return allow_unsandboxed or os.environ.get(UNSANDBOXED_ENV, "") == "1"


def check_isolation(allow_unsandboxed: bool = False) -> Isolation:
  """This machine's isolation; raises SandboxUnavailable without bubblewrap unless allowed."""
  mode = isolation()
  if mode.bwrap:
    return mode
  host_view = "host filesystem" + (" (as an unprivileged uid)" if mode.dedicated_uid else "")
  if not _unsandboxed_allowed(allow_unsandboxed):
    raise SandboxUnavailable(
        f"refusing to run untrusted code: {mode.missing}. Install bubblewrap "
        "(`apt-get install bubblewrap`) and allow unprivileged user namespaces "
        "(sysctl kernel.unprivileged_userns_clone=1 where it exists). To run with rlimits only, "
        f"set {UNSANDBOXED_ENV}=1 or allow_unsandboxed=True: the program then reads the "
        f"{host_view}, writes to its /tmp and reaches every network service, local ones too")
  warnings.warn(f"{mode.missing}: untrusted programs run WITHOUT isolation and see the "
                f"{host_view} ({UNSANDBOXED_ENV}=1 or allow_unsandboxed)", RuntimeWarning)
  return mode


def run_program(source: str, stdin: str, limits: Limits = Limits(),
                python_packages: tuple[str, ...] = (),
                allow_unsandboxed: bool = False) -> Execution:
  """Run Python `source` on `stdin` in the sandbox; thread-safe (one slot per running call).

  `python_packages`: installed top-level packages (e.g. "cyaron") the program may import; they
  are mounted read-only, nothing else of the parent's environment is importable.
  `allow_unsandboxed`: run with rlimits only where bubblewrap does not work (also
  KIMI_ALLOW_UNSANDBOXED=1); otherwise such a machine raises SandboxUnavailable.
  """
  mode = check_isolation(allow_unsandboxed)
  slot = _slots.get()
  try:
    return _launch(source, stdin, limits, tuple(python_packages), mode.bwrap, slot)
  finally:
    _slots.put(slot)
