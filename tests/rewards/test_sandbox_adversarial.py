"""Adversarial battery for the code sandbox: every program is contained and scores 0.

Each program prints the expected output only if its attack worked (or tries to win by other
means), so a score of 0 means the attack failed. After each one: the parent (this process) and a
sibling process are alive, no process of the run is left (searched by a unique marker on the
command line and by the run's uids), and no watched file outside the temp dir changed.

The battery runs twice: with bubblewrap (contained; the fork bomb and kill(-1) are only safe
inside the full sandbox, so those tests first assert that bubblewrap works here, CI installs it,
and as root that runs get a dedicated uid) and with bubblewrap missing (every run refused
before anything starts, since the caller did not opt in to running unsandboxed).
"""
import hashlib
import os
import shutil
import socket
import subprocess
import textwrap
import threading
import uuid

import pytest

from kimi_jax.rewards import _sandbox
from kimi_jax.rewards.code import CaseStatus, run_tests

MARKER = f"kimi-sandbox-probe-{uuid.uuid4().hex}"
SECRET = f"secret-{uuid.uuid4().hex}"
TIMEOUT_S = 1.0  # every attack either ends quickly or is killed at this wall-clock limit
# A daemon started by a program: stays alive 30 s with MARKER on its command line.
SLEEPER = (f'os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)", '
           f'"{MARKER}"])')


@pytest.fixture(scope="module")
def full_sandbox():
  mode = _sandbox.isolation()
  assert mode.bwrap, (f"these tests need the full sandbox, missing here: {mode.missing} "
                      "(`apt-get install bubblewrap`; user namespaces must be allowed)")
  assert mode.dedicated_uid == (os.geteuid() == 0)


@pytest.fixture
def no_bubblewrap(monkeypatch):
  """This process as it would be on a machine without bwrap, and no opt-out set."""
  real_which = shutil.which
  monkeypatch.setattr(_sandbox.shutil, "which",
                      lambda name: None if name == "bwrap" else real_which(name))
  monkeypatch.setattr(_sandbox, "_isolation", None)
  monkeypatch.delenv(_sandbox.UNSANDBOXED_ENV, raising=False)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
  """World-writable files the sandbox must not touch, a sibling process, a listening socket."""
  canary_dir = tmp_path_factory.mktemp("canary")
  canary_dir.chmod(0o777)  # only the sandbox, not permissions, protects these
  (canary_dir / "canary.txt").write_text("untouched")
  (canary_dir / "secret.txt").write_text(SECRET)
  for f in canary_dir.iterdir():
    f.chmod(0o666)
  sibling = subprocess.Popen(["sleep", "600"])
  server = socket.create_server(("127.0.0.1", 0))
  accepted = []
  threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
  yield dict(dir=str(canary_dir), sibling=sibling, port=server.getsockname()[1],
             accepted=accepted)
  sibling.kill()
  server.close()


def _tree_digest(root: str) -> dict[str, str]:
  return {os.path.join(d, f): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
          for d, _, files in os.walk(root) for f in files}


def _leftover_processes() -> list[int]:
  """Live processes with MARKER on their command line or running as one of our sandbox uids."""
  uids = _sandbox.sandbox_uids()
  found = []
  for name in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{name}/cmdline", "rb") as f:
        cmdline = f.read()
      with open(f"/proc/{name}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    except (FileNotFoundError, ProcessLookupError):
      continue
    zombie = status["State"].strip().startswith("Z")
    if not zombie and (MARKER.encode() in cmdline or int(status["Uid"].split()[0]) in uids):
      found.append(int(name))
  return found


HOST_CWD = os.getcwd()
OUTSIDE_PATHS = [f"/tmp/{MARKER}", f"/var/tmp/{MARKER}", f"/dev/shm/{MARKER}",
                 os.path.expanduser(f"~/{MARKER}")]

ATTACKS = {
    "fork_bomb": ("""
        while True:
          try:
            os.fork()
          except OSError:
            pass
        """, "done"),
    "thread_bomb": ("""
        import threading, time
        for _ in range(10000):
          threading.Thread(target=time.sleep, args=(60,)).start()
        print(10000)
        """, "10000"),
    "busy_loop": ("while True: pass", "42"),
    "sleep_forever": ("import time; time.sleep(3600)", "42"),
    "memory_hog": ("""
        blocks = []
        while True:
          blocks.append(bytearray(64 * 2**20))
        """, "42"),
    "huge_output": ("""
        while True:
          sys.stdout.write("4" * 2**20)
        """, "42"),
    "huge_file": ("""
        with open("big", "wb") as f:
          for _ in range(4096):
            f.write(bytes(2**20))
        print("written")
        """, "written"),
    "write_outside": ("""
        for path in [CANARY + "/canary.txt", CANARY + "/new.txt"] + OUTSIDE:
          try:
            with open(path, "w") as f:
              f.write("pwned")
            if path.startswith(CANARY):
              print("pwned")
          except OSError:
            pass
        """, "pwned"),
    "delete_files": ("""
        import shutil
        shutil.rmtree(CANARY)
        print("deleted")
        """, "deleted"),
    "network": ("""
        import socket
        socket.create_connection(("127.0.0.1", PORT), timeout=0.5).sendall(b"hello")
        print("connected")
        """, "connected"),
    "env_secrets": ("""
        import glob
        found = [v for v in os.environ.values() if v.startswith("secret-")]
        for path in glob.glob("/proc/*/environ"):
          try:
            found += [e.split("=", 1)[1] for e in open(path, "rb").read().decode().split("\\0")
                      if "=secret-" in e]
          except OSError:
            pass
        print(found[0] if found else "nothing")
        """, SECRET),
    "read_host_file": ("print(open(CANARY + '/secret.txt').read())", SECRET),
    "daemon_prints_late": (f"""
        import time
        if os.fork() == 0:
          os.setsid()
          if os.fork() == 0:
            time.sleep(0.3)
            print(42, flush=True)
            {SLEEPER}
          os._exit(0)
        """, "42"),
    "setsid_escape": (f"""
        if os.fork() == 0:
          os.setsid()
          {SLEEPER}
        while True:
          pass
        """, "42"),
    "ignore_sigterm": ("""
        import signal
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):
          signal.signal(s, signal.SIG_IGN)
        while True:
          pass
        """, "42"),
    "kill_others": ("""
        import signal
        try:
          os.kill(SIBLING, signal.SIGKILL)
          print("killed")
        except OSError:
          pass
        try:
          os.kill(-1, signal.SIGKILL)
        except OSError:
          pass
        """, "killed"),
    "correct_then_hang": ("""
        print(42, flush=True)
        while True:
          pass
        """, "42"),
    "io_uring": ("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        params = ctypes.create_string_buffer(120)  # struct io_uring_params
        if libc.syscall(425, 4, params) >= 0:  # io_uring_setup, same number on x86_64/aarch64
          print("io_uring")
        """, "io_uring"),
    "keyring": ("""
        import ctypes, platform
        libc = ctypes.CDLL(None, use_errno=True)
        add_key = {"x86_64": 248, "aarch64": 217}[platform.machine()]
        if libc.syscall(add_key, b"user", b"kimi", b"secret", 6, -2) >= 0:  # process keyring
          print("keyring")
        """, "keyring"),
    "ptrace": ("""
        import ctypes, time
        libc = ctypes.CDLL(None, use_errno=True)
        child = os.fork()
        if child == 0:
          time.sleep(5)
          os._exit(0)
        if libc.ptrace(16, child, None, None) == 0:  # PTRACE_ATTACH
          print("traced")
        """, "traced"),
    "unshare": ("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for flags in (0x10000000, 0x00020000, 0x40000000):  # NEWUSER, NEWNS, NEWNET
          if libc.unshare(flags) == 0:
            print("unshared")
            break
        """, "unshared"),
    "mount": ("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) == 0:
          print("mounted")
        """, "mounted"),
    "fd_exhaustion": ("""
        opened = 0
        try:
          while opened < 1000:
            os.open("/dev/null", os.O_RDONLY)
            opened += 1
        except OSError:
          pass
        print("exhausted" if opened >= 1000 else opened)
        """, "exhausted"),
    "tmpfs_fill": ("""
        written = 0
        try:
          for i in range(32):
            with open(f"/tmp/fill{i}", "wb") as f:
              f.write(bytes(8 * 2**20))
            written += 8
        except OSError:
          pass
        print("filled" if written > 64 else written)
        """, "filled"),
    "host_paths_in_proc": ("""
        import glob
        texts = []
        for path in (["/proc/self/mountinfo", "/proc/mounts", "/proc/self/cgroup"]
                     + glob.glob("/proc/[0-9]*/cmdline") + glob.glob("/proc/[0-9]*/environ")
                     + glob.glob("/proc/[0-9]*/cwd")):
          try:
            texts.append(os.readlink(path) if path.endswith("cwd")
                         else open(path, "rb").read().decode(errors="replace"))
          except OSError:
            pass
        leaks = [t for t in texts if "kimi_sandbox_" in t or CANARY in t or HOST_CWD in t]
        print("leaked" if leaks else "clean")
        """, "leaked"),
    "always_equal": ("""
        class AlwaysEqual(str):
          def __eq__(self, other):
            return True
          def __ne__(self, other):
            return False
          __hash__ = str.__hash__
        print(AlwaysEqual("forty-two"))
        """, "42"),
}


def _program(name: str, host: dict) -> tuple[str, str]:
  body, expected = ATTACKS[name]
  prelude = (f"import os, sys\nCANARY = {host['dir']!r}\nOUTSIDE = {OUTSIDE_PATHS!r}\n"
             f"PORT = {host['port']}\nSIBLING = {host['sibling'].pid}\n"
             f"HOST_CWD = {HOST_CWD!r}\n")
  return prelude + textwrap.dedent(body), expected


def _assert_host_untouched(host: dict, before: dict) -> None:
  assert host["sibling"].poll() is None, "sibling process was killed"
  assert _leftover_processes() == []
  assert _tree_digest(host["dir"]) == before
  assert not [p for p in OUTSIDE_PATHS if os.path.exists(p)]
  assert host["accepted"] == [], "the program reached a host socket"


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_contained_and_scores_zero(name, host, monkeypatch, full_sandbox):
  program, expected = _program(name, host)
  before = _tree_digest(host["dir"])
  monkeypatch.setenv("KIMI_TEST_SECRET", SECRET)  # the parent holds a secret in its environment
  result = run_tests(program, [("", expected)], timeout_s=TIMEOUT_S)
  assert result.score == 0.0, result.statuses
  assert result.statuses[0] is not CaseStatus.PASSED
  _assert_host_untouched(host, before)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_refused_without_bubblewrap(name, host, no_bubblewrap):
  program, expected = _program(name, host)
  before = _tree_digest(host["dir"])
  with pytest.raises(_sandbox.SandboxUnavailable,
                     match=r"bubblewrap \(bwrap\) is not installed.*apt-get install bubblewrap"):
    run_tests(program, [("", expected)], timeout_s=TIMEOUT_S)
  _assert_host_untouched(host, before)


def test_battery_covers_the_issue_list():
  assert len(ATTACKS) >= 23


def test_fork_bomb_really_hits_the_process_limit(host, full_sandbox):
  # Containment must come from RLIMIT_NPROC (not luck): count the forks that succeed.
  source = textwrap.dedent("""
      import os, time
      n = 0
      try:
        while n < 1000:
          if os.fork() == 0:
            time.sleep(5)
            os._exit(0)
          n += 1
      except OSError:
        pass
      print(n)
      """)
  limits = _sandbox.Limits(timeout_s=5.0, max_processes=16)
  execution = _sandbox.run_program(source, "", limits)
  # 16 processes: this one plus 15 children.
  assert execution.ok and int(execution.stdout) == 15, execution
  assert _leftover_processes() == []


def test_a_benign_program_still_passes(full_sandbox):
  # Control: the same harness scores an honest program 1.
  result = run_tests("import sys\nprint(sum(map(int, sys.stdin.read().split())))",
                     [("40 2", "42")], timeout_s=TIMEOUT_S)
  assert result.score == 1.0
