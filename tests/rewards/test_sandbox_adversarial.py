"""Adversarial battery for the code sandbox: every program is contained and scores 0.

Each program prints the expected output only if its attack worked (or tries to win by other
means), so a score of 0 means the attack failed. After each one: the parent (this process) and a
sibling process are alive, no process of the run is left (searched by a unique marker on the
command line and by the run's uids), and no watched file outside the temp dir changed.

The fork bomb and kill(-1) are only safe inside the full sandbox, so the module first asserts
that bubblewrap works here (CI installs it) and, as root, that runs get a dedicated uid.
"""
import hashlib
import os
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


@pytest.fixture(scope="module", autouse=True)
def full_sandbox():
  mode = _sandbox.isolation()
  assert mode.bwrap, ("bubblewrap must work for the adversarial battery "
                      "(apt-get install bubblewrap; user namespaces must be allowed)")
  assert mode.dedicated_uid == (os.geteuid() == 0)


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


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_contained_and_scores_zero(name, host, monkeypatch):
  body, expected = ATTACKS[name]
  prelude = (f"import os, sys\nCANARY = {host['dir']!r}\nOUTSIDE = {OUTSIDE_PATHS!r}\n"
             f"PORT = {host['port']}\nSIBLING = {host['sibling'].pid}\n")
  before = _tree_digest(host["dir"])
  monkeypatch.setenv("KIMI_TEST_SECRET", SECRET)  # the parent holds a secret in its environment
  result = run_tests(prelude + textwrap.dedent(body), [("", expected)], timeout_s=TIMEOUT_S)
  assert result.score == 0.0, result.statuses
  assert result.statuses[0] is not CaseStatus.PASSED
  assert host["sibling"].poll() is None, "sibling process was killed"
  assert _leftover_processes() == []
  assert _tree_digest(host["dir"]) == before
  assert not [p for p in OUTSIDE_PATHS if os.path.exists(p)]
  assert host["accepted"] == [], "the program reached a host socket"


def test_battery_covers_the_issue_list():
  assert len(ATTACKS) >= 15


def test_fork_bomb_really_hits_the_process_limit(host):
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


def test_a_benign_program_still_passes():
  # Control: the same harness scores an honest program 1.
  result = run_tests("import sys\nprint(sum(map(int, sys.stdin.read().split())))",
                     [("40 2", "42")], timeout_s=TIMEOUT_S)
  assert result.score == 1.0
