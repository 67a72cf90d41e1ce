"""Hostile payload suite: every payload goes through the real server (REPLACE_LINES, then
RUN_TESTS or SUBMIT over HTTP), and after each one the suite checks that the server is
healthy, another session is unaffected, no process or working directory is left behind, the
server's fd count is unchanged, and the secret in the server's exec-time environment appears
in no observation.

The suite runs twice: with every layer the kernel offers, and with Landlock forced off
(``SANDBOX_DISABLE_LANDLOCK=1``), which pins the degraded-mode expectations: reading files
outside the working directory then succeeds; everything else is unchanged (the filesystem
stays read-only through the seccomp filter, so nothing can be written, deleted or planted).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import httpx
import pytest

from tests.conftest import FAKE_SECRET, REPO, ServerProcess
from tracefix_rl.episode.trace import REPORT_CHARS
from tracefix_rl.sandbox import layers

TASK = "sum_of_evens_wrong_modulus"
CORRECT = "def sum_of_evens(nums):\n    return sum(n for n in nums if n % 2 == 0)\n"
VISIBLE = 4
SERVER_ENV = {
    "SANDBOX_WALL_TIMEOUT_S": "2",
    "SANDBOX_TEST_TIMEOUT_S": "0.5",
    "SANDBOX_CPU_S": "2",
    "SANDBOX_WORKERS": "2",
}


# -- the hostile world around the server ------------------------------------------------------


class Listeners:
    """TCP, UDP and unix-socket listeners on this machine that payloads try to reach."""

    def __init__(self, directory: Path) -> None:
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.unix_path = str(directory / "listener.sock")
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(self.unix_path)
        os.chmod(self.unix_path, 0o777)
        self.abstract_name = f"tracefix-test-{os.getpid()}"
        self.abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.abstract.bind("\0" + self.abstract_name)
        for sock in (self.tcp, self.unix, self.abstract):
            sock.listen(8)
        for sock in (self.tcp, self.udp, self.unix, self.abstract):
            sock.setblocking(False)

    def contacts(self) -> list[str]:
        """Connections accepted / datagrams received since the last call."""
        seen = []
        for name, sock in (("tcp", self.tcp), ("unix", self.unix), ("abstract", self.abstract)):
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                conn.close()
                seen.append(name)
        while True:
            try:
                self.udp.recvfrom(4096)
            except BlockingIOError:
                break
            seen.append("udp")
        return seen

    def close(self) -> None:
        for sock in (self.tcp, self.udp, self.unix, self.abstract):
            sock.close()


@dataclass
class World:
    server: ServerProcess
    root: Path
    victims: Path
    listeners: Listeners
    landlock: bool
    seccomp: bool
    child_uid: int
    baseline_pids: set[int] = field(default_factory=set)
    baseline_fds: int = 0
    canary_edits: int = 0

    def values(self) -> dict[str, str]:
        return {
            "victim_dir": str(self.victims),
            "tcp_port": str(self.listeners.tcp.getsockname()[1]),
            "udp_port": str(self.listeners.udp.getsockname()[1]),
            "unix_path": self.listeners.unix_path,
            "abstract_name": self.listeners.abstract_name,
            "task_file": str(REPO / "task_data" / "curated" / f"{TASK}.toml"),
        }


def reset_victims(victims: Path) -> None:
    for child in victims.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    (victims / "keep.txt").write_text("keep me")
    (victims / "secret.txt").write_text("VICTIM-CONTENT-51")
    for path in victims.iterdir():
        os.chmod(path, 0o666)


@pytest.fixture(scope="module", params=["all_layers", "no_landlock"])
def world(request) -> Iterator[World]:
    base = Path(tempfile.mkdtemp(prefix="tracefix-payloads-"))
    os.chmod(base, 0o755)
    root, victims = base / "sandbox", base / "victims"
    root.mkdir()
    victims.mkdir()
    os.chmod(victims, 0o777)  # only Landlock stands between the child and these files
    reset_victims(victims)
    env = {**SERVER_ENV, "SANDBOX_ROOT": str(root)}
    if request.param == "no_landlock":
        env["SANDBOX_DISABLE_LANDLOCK"] = "1"
    server = ServerProcess(extra_env=env)
    listeners = Listeners(base)
    facts = httpx.get(f"{server.url}/health").json()["sandbox"]
    world = World(
        server=server,
        root=root,
        victims=victims,
        listeners=listeners,
        landlock=facts["landlock_abi"] > 0,
        seccomp=facts["seccomp"],
        child_uid=65534 if os.geteuid() == 0 else os.geteuid(),
    )
    # pin the layers this run has: seccomp and rlimits always; Landlock whenever the kernel
    # offers it (unless forced off); the uid drop exactly when running as root
    assert world.seccomp and facts["rlimits"] and facts["non_dumpable"]
    assert facts["uid_drop"] is (os.geteuid() == 0)
    if request.param == "no_landlock":
        assert not world.landlock and facts["degraded"] == ["landlock"]
    else:
        assert facts["landlock_abi"] == layers.landlock_abi()
    post(world, "/reset", {"task_id": TASK, "episode_id": "canary"})
    canary_check(world)
    world.baseline_pids = set(all_pids())

    world.baseline_fds = health(world)["server"]["open_fds"]
    yield world
    listeners.close()
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


def post(world: World, path: str, body: dict) -> dict:
    """POST ``body`` as ASCII JSON (lone surrogates in it travel as ``\\udXXX`` escapes)."""
    response = httpx.post(
        f"{world.server.url}{path}",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert FAKE_SECRET not in response.text
    return response.json()


def health(world: World) -> dict:
    response = httpx.get(f"{world.server.url}/health", timeout=30)
    assert response.status_code == 200
    return response.json()


def replace_all(world: World, episode: str, code: str) -> dict:
    body = post(world, "/step", {"episode_id": episode, "action": {"action_type": "VIEW_CODE"}})
    lines = len(body["observation"]["code_dict"])
    return post(world, "/step", {"episode_id": episode, "action": {
        "action_type": "REPLACE_LINES", "start_line": 1, "end_line": lines,
        "new_code_block": code}})  # fmt: skip


def canary_check(world: World) -> None:
    """Another session keeps working: a long-lived episode's fresh correct edit passes every
    visible test, and a new episode is solved."""
    world.canary_edits += 1
    replace_all(world, "canary", CORRECT + f"# edit {world.canary_edits}")
    run = post(world, "/step", {"episode_id": "canary", "action": {"action_type": "RUN_TESTS"}})
    assert run["observation"]["tests_passed"] == VISIBLE, run["observation"]["test_results"]
    assert run["observation"]["episode_id"] == "canary"
    fresh = f"canary-{world.canary_edits}"
    post(world, "/reset", {"task_id": TASK, "episode_id": fresh})
    replace_all(world, fresh, CORRECT)
    done = post(world, "/step", {"episode_id": fresh, "action": {"action_type": "SUBMIT"}})
    assert done["done"] is True and done["observation"]["solved"] is True, done["observation"]


# -- process bookkeeping ------------------------------------------------------------------------


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def process_uid_and_parent(pid: int) -> tuple[int, int] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields.get("State", "").strip().startswith("Z"):
        return None
    return int(fields["Uid"].split()[0]), int(fields["PPid"])


def leftover_workdirs(root: Path) -> list[str]:
    """Evaluation working directories under ``root``. ``os.walk`` skips directories that
    vanish mid-walk (the worker removes each one right after answering)."""
    found = []
    for parent, dirs, _ in os.walk(root):
        found += [os.path.join(parent, name) for name in dirs if name.startswith("run-")]
    return found


def ours(pid: int, facts: dict[int, tuple[int, int]], world: World) -> bool:
    """Whether ``pid`` belongs to the server under test: it descends from it, or it works
    in its sandbox root (a process that escaped its parent would be re-parented). Other
    tests' servers may run at the same time on this machine."""
    seen = set()
    while pid in facts and pid not in seen:
        seen.add(pid)
        pid = facts[pid][1]
        if pid == world.server.proc.pid:
            return True
    try:
        return os.readlink(f"/proc/{next(iter(seen))}/cwd").startswith(str(world.root))
    except (OSError, StopIteration):
        return False


def leftover_processes(world: World) -> list[int]:
    """Processes of the server under test that appeared during the payload, run as the
    sandbox uid, and are neither a worker (a direct child of the server; respawned ones are
    allowed) nor the one pre-forked child each worker keeps waiting for its next request."""
    server_pid = world.server.proc.pid
    facts = {}
    for pid in all_pids():
        found = process_uid_and_parent(pid)
        if found is not None:
            facts[pid] = found
    workers = {pid for pid, (_, parent) in facts.items() if parent == server_pid}
    waiting: dict[int, list[int]] = {}
    leftovers = []
    for pid, (uid, parent) in facts.items():
        if pid in world.baseline_pids or pid in workers or pid in (os.getpid(), server_pid):
            continue
        if uid != world.child_uid or not ours(pid, facts, world):
            continue
        if parent in workers:
            waiting.setdefault(parent, []).append(pid)
        else:
            leftovers.append(pid)
    for children in waiting.values():
        leftovers += sorted(children)[:-1]  # more than one child: the older ones linger
    return leftovers


# -- payloads -----------------------------------------------------------------------------------


@dataclass
class Payload:
    name: str
    code: str
    check: Callable[[dict, World], None]
    action: str = "RUN_TESTS"
    needs_seccomp: bool = False
    params: dict[str, Any] = field(default_factory=dict)  # the action's parameters


def passed(n: int) -> Callable[[dict, World], None]:
    def check(obs: dict, world: World) -> None:
        assert obs["tests_passed"] == n, obs["test_results"]

    return check


def all_fail_with(fragment: str) -> Callable[[dict, World], None]:
    def check(obs: dict, world: World) -> None:
        assert obs["tests_passed"] == 0
        assert all(fragment in (r["error_message"] or "") for r in obs["test_results"]), obs

    return check


def victim_file(name: str, exists: bool) -> Callable[[dict, World], None]:
    """The write was refused (read-only filesystem) and the victim file is as it was."""

    def check(obs: dict, world: World) -> None:
        assert obs["tests_passed"] == VISIBLE, obs["test_results"]
        assert "DENIED OSError" in obs["last_execution_output"], obs["last_execution_output"]
        assert (world.victims / name).exists() is exists

    return check


def victim_absent(name: str) -> Callable[[dict, World], None]:
    def check(obs: dict, world: World) -> None:
        assert not (world.victims / name).exists()
        assert "DENIED PermissionError" in obs["last_execution_output"]
        assert obs["tests_passed"] == VISIBLE, obs["test_results"]

    return check


def solved(obs: dict, world: World) -> None:
    assert obs["solved"] is True and obs["score"] == 1.0


def flood_capped(obs: dict, world: World) -> None:
    assert obs["tests_passed"] == VISIBLE, obs["test_results"]
    assert len(obs["last_execution_output"]) < 8000


def limits_not_raised(obs: dict, world: World) -> None:
    assert obs["tests_passed"] == 0
    for result in obs["test_results"]:
        assert (
            "ValueError" in result["error_message"]
            or "PermissionError" in (result["error_message"])
        ), result


def output_has(*fragments: str, absent: tuple[str, ...] = ()) -> Callable[[dict, World], None]:
    def check(obs: dict, world: World) -> None:
        out = obs["last_execution_output"]
        for fragment in fragments:
            assert fragment in out, out
        for fragment in absent:
            assert fragment not in out, out

    return check


def read_outside(obs: dict, world: World) -> None:
    out = obs["last_execution_output"]
    assert ("VICTIM-CONTENT-51" in out) is (not world.landlock), out
    assert obs["tests_passed"] == VISIBLE, obs["test_results"]


def read_task_data(obs: dict, world: World) -> None:
    out = obs["last_execution_output"]
    assert ("hidden_tests" in out) is (not world.landlock), out


def no_network(obs: dict, world: World) -> None:
    assert obs["tests_passed"] == VISIBLE, obs["test_results"]
    assert "CONNECTED" not in obs["last_execution_output"]
    assert world.listeners.contacts() == []


def planted(obs: dict, world: World) -> None:
    for path in ("/tmp/tracefix_planted.py", "/dev/shm/tracefix_planted.py"):
        exists = os.path.exists(path)
        if exists:
            os.unlink(path)
        assert not exists, path


def proc_of_server(obs: dict, world: World) -> None:
    out = obs["last_execution_output"]
    assert "environ:PermissionError" in out or "status:PermissionError" in out, out
    assert "mem:PermissionError" in out or "status:PermissionError" in out, out


def forged_submit(obs: dict, world: World) -> None:
    """Forging records only matches values the forger already knows (the visible example)."""
    assert obs["score"] is not None and obs["solved"] is False and obs["score"] < 0.5


def trace_bounded(*expected: str) -> Callable[[dict, World], None]:
    """A TRACE report, within its cap, saying each of ``expected``."""

    def check(obs: dict, world: World) -> None:
        report = obs["last_execution_output"]
        assert obs["last_action_error"] is None, obs["last_action_error"]
        assert report.startswith("TRACE of visible test 1 of 4") and len(report) <= REPORT_CHARS
        for text in expected:
            assert text in report, report

    return check


def trace_reads_task_file(obs: dict, world: World) -> None:
    """A watch expression is agent code: it runs in the sandbox child, no further."""
    trace_bounded("Result: PASS")(obs, world)
    report = obs["last_execution_output"]
    assert ("= True" in report) is (not world.landlock), report


def tampered(obs: dict, world: World) -> None:
    assert obs["tests_passed"] == 0
    assert all("tampered" in r["error_message"] for r in obs["test_results"])


def nothing_of_other_evaluations(obs: dict, world: World) -> None:
    line = next(x for x in obs["last_execution_output"].splitlines() if x.startswith("SCAN"))
    fields = dict(part.split("=") for part in line.split()[1:])
    assert int(fields["pages"]) > 1000, line  # the scan read memory...
    assert fields["gc"] == "own" and fields["raw"] == "own", line  # ...and saw only its own


def filesystem_untouched(*denials: str) -> Callable[[dict, World], None]:
    """Every filesystem change was refused with these errors (``DENIED <type>`` lines), the
    victims are as they were and every worker's directory is still empty."""

    def check(obs: dict, world: World) -> None:
        out = obs["last_execution_output"]
        for denial in denials:
            assert f"DENIED {denial}" in out, out
        assert obs["tests_passed"] == VISIBLE, obs["test_results"]
        assert (world.victims / "keep.txt").read_text() == "keep me"
        assert (world.victims / "keep.txt").stat().st_mode & 0o777 == 0o666
        assert sorted(p.name for p in world.victims.iterdir()) == ["keep.txt", "secret.txt"]
        for cwd in world.root.glob("*/w*/cwd"):
            assert list(cwd.iterdir()) == [], cwd

    return check


def each_denied(*statements: str) -> str:
    """Run every statement at import, printing ``DENIED <type>`` for each that fails."""
    lines = []
    for statement in statements:
        lines += ["try:", f"    {statement}", "except Exception as exc:",
                  "    print('DENIED', type(exc).__name__)"]  # fmt: skip
    return "\n".join(lines) + "\n" + CORRECT


def scored_despite_surrogates(obs: dict, world: World) -> None:
    """The graded episode delivered its score (the response was encodable)."""
    assert obs["score"] == 0.0 and obs["solved"] is False and obs["steps_remaining"] >= 0
    assert "\\udcff" in json.dumps(obs), obs["last_execution_output"]


def surrogates_escaped(obs: dict, world: World) -> None:
    details = " ".join(r["error_message"] or "" for r in obs["test_results"])
    assert "\\ud800" in details or "\\udcff" in details, details
    assert obs["tests_passed"] == 0


def killed_by_sigsys(obs: dict, world: World) -> None:
    assert obs["tests_passed"] == 0
    assert "signal 31" in obs["test_results"][0]["error_message"], obs["test_results"]


def guarded(code: str) -> str:
    """Run ``code`` at import, reporting any exception, then define the correct function."""
    body = "\n".join("    " + line for line in code.strip("\n").splitlines())
    handler = "except Exception as exc:\n    print('DENIED', type(exc).__name__)\n"
    return f"try:\n{body}\n{handler}" + CORRECT


PROC_PROBE = """
import os
def probe():
    found = []
    try:
        zygote = os.getppid()
        status = open('/proc/%d/status' % zygote).read()
        server = int(status.split('PPid:')[1].split()[0])
    except Exception as exc:
        return ['status:' + type(exc).__name__]
    for name in ('environ', 'mem', 'cmdline'):
        try:
            with open('/proc/%d/%s' % (server, name), 'rb') as handle:
                found.append(name + ':' + handle.read(65536).decode('latin-1'))
        except Exception as exc:
            found.append(name + ':' + type(exc).__name__)
    return found
print(probe())
"""

SHELLCODE = """
import ctypes, mmap
def sum_of_evens(nums):
    code = b'\\xb8\\x14\\x00\\x00\\x00\\xcd\\x80\\xc3'  # mov eax, 20; int 0x80 (i386 getpid); ret
    buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    return ctypes.CFUNCTYPE(ctypes.c_int)(address)()
"""

FRAME_WALK_FORGERY = """
import os, sys
def sum_of_evens(nums):
    frame = sys._getframe()
    while frame is not None and 'fd' not in frame.f_locals:
        frame = frame.f_back
    fd = frame.f_locals['fd']
    for index in range(40):
        os.write(fd, b'{"i": %d, "v": 6}\\n' % index)
    os._exit(0)
"""

TRACE_FORGERY = """
import os, sys
FAKE = {"end": "value", "path": [1] * 1999, "events": 10**12, "snaps": [
    {"line": 1, "hit": 1, "locals": {"v" * 60: "x" * 5000 for _ in range(1)}}] * 60}
def sum_of_evens(nums):
    frame = sys._getframe()
    while frame is not None and 'fd' not in frame.f_locals:
        frame = frame.f_back
    if frame is not None:
        import json
        os.write(frame.f_locals['fd'], (json.dumps({"trace": FAKE}) + "\\n").encode())
    return sum(n for n in nums if n % 2 == 0)
"""

TRACE_HIJACK = """
import sys
sys.settrace = lambda *args: None
class Loud:
    def __repr__(self):
        return "L" * 10**7
class Stuck:
    def __repr__(self):
        while True:
            pass
def sum_of_evens(nums):
    loud, stuck = Loud(), Stuck()
    return sum(n for n in nums if n % 2 == 0)
"""

GC_FORGERY = """
import gc, os
def sum_of_evens(nums):
    for obj in gc.get_objects():
        if callable(obj) and getattr(obj, '__name__', '') == 'emit':
            for index in range(20):
                obj({'i': index, 'v': 6})
            os._exit(0)
    return -1
"""

SYSCALL = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"

# Reads every string this process can reach through the garbage collector, and every page
# of memory around the heap and the interpreter's object arenas (a pipe write of an unmapped
# address fails with EFAULT instead of crashing, so the scan is safe), looking for the task's
# hidden tests and for another payload's code. Its own visible tests must be found by both
# methods: that proves the scan sees where request data lives.
MEMORY_SCAN = """
import ctypes, gc, os, sys
# Every byte shifted by one, and memory shifted the same way before the search, so that the
# needles never sit in this process's memory, not even in the shifted copies the search
# makes (shifting twice does not give them back, as reversing or XOR would).
SHIFT = bytes((b + 1) % 256 for b in range(256))
NEEDLES = {
    'own': b'tvn`pg`fwfot)\\\\8-!:-!22^*',
    'hidden1': b'tvn`pg`fwfot)\\\\.5-!.4-!3^*',
    'hidden2': b'tvn`pg`fwfot)mjtu)sbohf)212***',
    'hidden3': b'tvn`pg`fwfot))5-!6-!7**',
    'other_payload': b'usbdfgjy`qmboufe',
}
WINDOW = 48 * 2 ** 20
def found_in(data):
    data = data.translate(SHIFT)
    return {name for name, needle in NEEDLES.items() if needle in data}
def scan():
    texts = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, dict):
                texts += [t for pair in obj.items() for t in pair if isinstance(t, str)]
            elif isinstance(obj, (list, tuple)):
                texts += [t for t in obj if isinstance(t, str)]
        except Exception:
            pass
    gc_found = found_in('\\n'.join(texts).encode('utf-8', 'replace'))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sbrk.restype = ctypes.c_void_p
    libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    read_end, write_end = os.pipe()
    pages, raw, seen = 0, set(), set()
    for anchor in (libc.sbrk(0), id(NEEDLES), id(sys.modules)):
        base = anchor & ~0xFFF
        tail = b''
        for address in range(base - WINDOW, base + WINDOW, 4096):
            if address in seen or address <= 0:
                tail = b''
                continue
            seen.add(address)
            if libc.write(write_end, address, 4096) != 4096:
                tail = b''
                continue
            page = tail + os.read(read_end, 4096)
            pages += 1
            raw |= found_in(page)
            tail = page[-64:]
    return 'SCAN pages=%d gc=%s raw=%s' % (pages, ','.join(sorted(gc_found)), ','.join(sorted(raw)))
if not hasattr(sys, 'scan_result'):
    sys.scan_result = scan()
print(sys.scan_result)
"""

PAYLOADS = [
    Payload("honest_fix", CORRECT, passed(VISIBLE)),
    Payload("honest_fix_submit", CORRECT, solved, action="SUBMIT"),
    Payload("infinite_loop_at_import", "while True:\n    pass\n" + CORRECT, passed(0)),
    Payload("infinite_loop_in_function",
            "def sum_of_evens(nums):\n    while True:\n        pass\n", all_fail_with("timed out")),
    Payload("ignore_sigterm_sigalrm_and_sleep",
            "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
            "def sum_of_evens(nums):\n    time.sleep(100)\n", all_fail_with("no result")),
    Payload("fork_bomb", "import os\n" + guarded("while True:\n    os.fork()"),
            passed(VISIBLE), needs_seccomp=True),
    Payload("memory_bomb", "def sum_of_evens(nums):\n    return len(bytearray(8 * 1024 ** 3))\n",
            all_fail_with("MemoryError")),
    Payload("memory_growth",
            "def sum_of_evens(nums):\n    hog = []\n    while True:\n"
            "        hog.append(' ' * 10**6)\n",
            passed(0)),
    # 10 MB per test: 160x the output cap, yet a small share of the 0.5 s test budget (at
    # 100 MB, allocating and encoding took ~0.25 s per test and timed out on a loaded machine).
    Payload("output_flood_then_correct", guarded("print('x' * 10**7)"), flood_capped),
    Payload("output_flood_forever",
            "def sum_of_evens(nums):\n    while True:\n        print('y' * 10000)\n", passed(0)),
    Payload("write_outside_workdir", guarded("open('$victim_dir/written.txt', 'w').write('x')"),
            victim_file("written.txt", exists=False)),
    Payload("delete_outside_workdir", guarded("import os\nos.unlink('$victim_dir/keep.txt')"),
            victim_file("keep.txt", exists=True)),
    Payload("read_outside_workdir", guarded("print('READ', open('$victim_dir/secret.txt').read())"),
            read_outside),
    Payload("read_hidden_task_data", guarded("print(open('$task_file').read())"), read_task_data),
    Payload("read_own_environment", guarded("import os\nprint(dict(os.environ))"),
            output_has("PATH", absent=(FAKE_SECRET,))),
    Payload("read_server_proc_files", PROC_PROBE + CORRECT, proc_of_server),
    Payload("tcp_connect", guarded(
        "import socket\nsocket.create_connection(('127.0.0.1', $tcp_port), 1)\nprint('CONNECTED')"),
        no_network),
    Payload("udp_send", guarded(
        "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', "
        "('127.0.0.1', $udp_port))\nprint('CONNECTED')"), no_network),
    Payload("unix_socket_connect", guarded(
        "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('$unix_path')\n"
        "print('CONNECTED')"), no_network),
    Payload("abstract_unix_socket_connect", guarded(
        "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0$abstract_name')\n"
        "print('CONNECTED')"), no_network),
    Payload("kill_parent", guarded("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)"),
            output_has("DENIED PermissionError"), needs_seccomp=True),
    Payload("kill_everything", guarded("import os, signal\nos.kill(-1, signal.SIGKILL)"),
            output_has("DENIED PermissionError"), needs_seccomp=True),
    Payload("setsid", guarded("import os\nos.setsid()"), output_has("DENIED PermissionError")),
    Payload("exec_shell", guarded(
        "import os\nos.execv('/bin/sh', ['sh', '-c', 'touch $victim_dir/exec_ran'])"),
        victim_absent("exec_ran")),
    Payload("subprocess_via_posix_spawn", guarded(
        "import os\nos.posix_spawn('/bin/sh', ['sh', '-c', 'touch $victim_dir/spawned'], {})"),
        victim_absent("spawned")),
    Payload("sys_exit_at_import", "import sys\nsys.exit(0)\n" + CORRECT,
            all_fail_with("SystemExit")),
    Payload("os_exit_in_function", "import os\ndef sum_of_evens(nums):\n    os._exit(0)\n",
            all_fail_with("no result")),
    Payload("always_equal_object",
            "class Anything:\n    def __eq__(self, other):\n        return True\n"
            "    __hash__ = object.__hash__\n"
            "def sum_of_evens(nums):\n    return Anything()\n", all_fail_with("unserializable")),
    Payload("int_subclass_with_correct_value",
            "class Sly(int):\n    def __eq__(self, other):\n        return True\n"
            "    __hash__ = int.__hash__\n"
            "def sum_of_evens(nums):\n    return Sly(sum(n for n in nums if n % 2 == 0))\n",
            all_fail_with("unserializable")),
    Payload("frame_walk_forged_records", FRAME_WALK_FORGERY, forged_submit, action="SUBMIT"),
    Payload("trace_forged_trace_record", TRACE_FORGERY, trace_bounded(
        "Result: PASS", "no trace: the program wrote records of its own"),
        action="TRACE", params={"test": 1}),
    Payload("trace_hijack_and_repr_bombs", TRACE_HIJACK, trace_bounded("Result: PASS"),
            action="TRACE", params={"test": 1, "lines": [12], "watch": ["loud", "stuck"]}),
    Payload("trace_watch_kills_the_parent", CORRECT, trace_bounded("PermissionError"),
            action="TRACE", params={"test": 1, "lines": [2], "watch": [
                "__import__('os').kill(__import__('os').getppid(), 9)"]}, needs_seccomp=True),
    Payload("trace_watch_reads_the_task", CORRECT, trace_reads_task_file, action="TRACE",
            params={"test": 1, "lines": [2],
                    "watch": ["'hidden_tests' in open('$task_file').read()"]}),
    Payload("gc_found_emit_forgery", GC_FORGERY, tampered),
    Payload("forged_records_on_other_fds", guarded(
        "import os\nfor fd in range(3, 64):\n    try:\n"
        "        os.write(fd, b'{\"i\": 0, \"v\": 6}\\n{\"i\": 0, \"v\": 6}\\n')\n"
        "    except OSError:\n        pass"), tampered),
    Payload("monkeypatch_json_and_builtins",
            "import json, builtins\njson.dumps = lambda *a, **k: '{\"i\": 0, \"v\": 6}'\n"
            "builtins.isinstance = lambda *a: True\n"
            "def sum_of_evens(nums):\n    return -1\n", passed(0)),
    Payload("lingering_threads",
            "import threading, time\nthreading.Thread(target=time.sleep, args=(1000,)).start()\n"
            + CORRECT, passed(VISIBLE)),
    Payload("segfault_via_ctypes", "import ctypes\nctypes.string_at(0)\n" + CORRECT,
            all_fail_with("signal 11")),
    Payload("deep_recursion",
            "import sys\nsys.setrecursionlimit(10**6)\n"
            "def sum_of_evens(nums, depth=0):\n    return sum_of_evens(nums, depth + 1)\n",
            passed(0)),
    Payload("zip_bomb",
            "import zlib\nBOMB = zlib.compress(bytes(2 ** 26), 9)\n"
            "def sum_of_evens(nums):\n    out = []\n    while True:\n"
            "        out.append(zlib.decompress(BOMB))\n", passed(0)),
    Payload("raise_rlimits",
            "import resource\ndef sum_of_evens(nums):\n    resource.setrlimit(resource.RLIMIT_AS, "
            "(resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n    return 0\n",
            limits_not_raised),
    Payload("plant_files_in_tmp_and_shm", guarded(
        "for path in ('/tmp/tracefix_planted.py', '/dev/shm/tracefix_planted.py'):\n"
        "    try:\n        open(path, 'w').write('planted')\n    except OSError:\n        pass"),
        planted),
    Payload("ptrace_parent", SYSCALL + "import os\nprint('PTRACE', libc.ptrace(16, os.getppid(), "
            "0, 0), ctypes.get_errno())\n" + CORRECT, output_has("PTRACE -1 1")),
    Payload("io_uring_setup", SYSCALL + "params = ctypes.create_string_buffer(120)\n"
            "print('IOURING', libc.syscall(425, 8, params), ctypes.get_errno())\n" + CORRECT,
            output_has("IOURING -1 1")),
    Payload("unshare_namespaces", SYSCALL + "print('UNSHARE', libc.unshare(0x10000000 | "
            "0x40000000), ctypes.get_errno())\n" + CORRECT, output_has("UNSHARE -1 1")),
    Payload("foreign_arch_syscall", SHELLCODE, killed_by_sigsys, needs_seccomp=True),
    # -- the filesystem is read-only: no shape of tree, no flood of files (items 1 and 3) --
    Payload("deep_directory_tree", guarded(
        "import os\nfor level in range(20000):\n    os.mkdir('d')\n    os.chdir('d')"),
            filesystem_untouched("OSError")),
    Payload("file_flood", guarded(
        "for i in range(16000):\n    open('f%d' % i, 'wb').write(b'x' * 65536)"),
        filesystem_untouched("OSError")),
    Payload("create_by_every_open_flag", each_denied(
        "import os; os.close(os.open('a', os.O_WRONLY | os.O_CREAT))",
        "import os; os.close(os.open('.', os.O_TMPFILE | os.O_RDWR))",
        "import os; os.close(os.open('$victim_dir/keep.txt', os.O_RDWR))",
        "import os; os.close(os.open('$victim_dir/keep.txt', os.O_WRONLY | os.O_APPEND))",
        "open('$victim_dir/keep.txt', 'r+').write('x')",
        "import tempfile; tempfile.TemporaryFile()",
        "import tempfile; tempfile.mkdtemp()",
    ), filesystem_untouched("OSError")),
    Payload("links_fifos_and_renames", each_denied(
        "import os; os.symlink('/etc', 'link')",
        "import os; os.link('$victim_dir/keep.txt', '$victim_dir/hard')",
        "import os; os.mkfifo('fifo')",
        "import os; os.rename('$victim_dir/keep.txt', '$victim_dir/moved')",
        "import os; os.mkdir('$victim_dir/sub')",
    ), filesystem_untouched("OSError", "PermissionError")),
    Payload("change_metadata_of_existing_files", each_denied(
        "import os; os.chmod('$victim_dir/keep.txt', 0)",
        "import os; os.chmod('.', 0o777)",
        "import os; os.truncate('$victim_dir/keep.txt', 0)",
        "import os; os.utime('$victim_dir/keep.txt', (0, 0))",
        "import os; os.unlink('$victim_dir/secret.txt')",
        "import os; os.rmdir('.')",
        "import os; os.setxattr('$victim_dir/keep.txt', 'user.x', b'1')",
    ), filesystem_untouched("OSError")),
    Payload("memfd_flood_is_bounded", guarded(
        "import os\nfds = []\nfor i in range(100000):\n"
        "    fd = os.memfd_create('m')\n    fds.append(fd)\n    os.write(fd, b'x' * 2 ** 20)"),
        filesystem_untouched("OSError")),
    # -- agent text that UTF-8 cannot encode (item 4) --
    Payload("surrogate_in_exception_then_submit",
            "def sum_of_evens(nums):\n    raise ValueError('bad \\udcff')\n",
            scored_despite_surrogates, action="SUBMIT"),
    Payload("raw_surrogates_in_values_names_and_output",
            "E = type('E\ud800', (Exception,), {})\n"
            "def sum_of_evens(nums):\n    print('\udcff')\n    raise E('\ud800')\n",
            surrogates_escaped),
    # -- the agent's own deaths stay its own results, never sandbox faults (item 5) --
    Payload("sigkill_itself", each_denied(
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
        "import signal; signal.raise_signal(signal.SIGKILL)",
        "import os, signal, threading; signal.pthread_kill(threading.get_ident(), 9)",
    ), output_has("DENIED PermissionError")),
    Payload("exit_with_the_setup_failure_code", "import os\nos._exit(70)\n" + CORRECT,
            all_fail_with("exit code 70")),
    Payload("abort", "import os\ndef sum_of_evens(nums):\n    os.abort()\n",
            all_fail_with("signal 6")),
    # last: after SUBMITs sent this task's hidden tests through the same workers
    Payload("memory_holds_nothing_of_other_evaluations", MEMORY_SCAN + CORRECT,
            nothing_of_other_evaluations),
]  # fmt: skip


def test_suite_is_large_enough():
    assert len({p.name for p in PAYLOADS}) == len(PAYLOADS) >= 30


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p.name)
def test_payload(world: World, payload: Payload):
    if payload.needs_seccomp and not world.seccomp:
        pytest.skip("only run where process creation and signals are denied by seccomp")
    reset_victims(world.victims)
    world.listeners.contacts()
    episode = f"payload-{payload.name}"
    post(world, "/reset", {"task_id": TASK, "episode_id": episode})
    code = Template(payload.code).safe_substitute(world.values())
    edit = replace_all(world, episode, code)
    assert edit["observation"]["last_action_error"] is None
    started = time.monotonic()
    params = json.loads(Template(json.dumps(payload.params)).safe_substitute(world.values()))
    action = {"action_type": payload.action, **params}
    result = post(world, "/step", {"episode_id": episode, "action": action})
    assert time.monotonic() - started < 30
    payload.check(result["observation"], world)

    # the aftermath: nothing broken, nothing left behind, nothing leaked
    facts = health(world)
    assert facts["status"] == "healthy"
    deadline = time.monotonic() + 10
    while facts["sandbox"]["workers_alive"] < facts["sandbox"]["workers"]:
        assert time.monotonic() < deadline, facts["sandbox"]
        time.sleep(0.1)
        facts = health(world)
    canary_check(world)
    deadline = time.monotonic() + 5  # workers SIGKILL the child, answer, then reap it
    while leftover_processes(world) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert leftover_processes(world) == []
    deadline = time.monotonic() + 5  # workers remove a workdir right after answering
    while leftover_workdirs(world.root) and time.monotonic() < deadline:
        time.sleep(0.02)
    for workdir in leftover_workdirs(world.root):
        pytest.fail(f"working directory left behind: {workdir}")
    assert health(world)["server"]["open_fds"] == world.baseline_fds
    if world.seccomp:
        assert facts["sandbox"]["respawns"] == 0
        assert facts["sandbox"]["faults"] == 0  # nothing the agent did counts as a fault


def test_workers_survived_every_payload(world: World):
    """Runs after the payloads of this mode (same module-scoped server)."""
    facts = health(world)["sandbox"]
    assert facts["workers_alive"] == facts["workers"]
    assert facts["evaluations"] >= len(PAYLOADS)


# -- faults of the sandbox during grading (issue 10, item 5): retried, never scored ------------

# Correct code whose first test names its process (PR_SET_NAME: /proc/<pid>/comm is readable
# by anyone) and sleeps, so the test can find the evaluation's process and kill it mid-run.
SLOW_CORRECT = (
    "import ctypes, sys, time\n"
    "if not hasattr(sys, 'named'):\n"
    "    sys.named = ctypes.CDLL(None).prctl(15, b'faultvictim', 0, 0, 0)\n"
    "    time.sleep(0.4)\n" + CORRECT
)


def victims(world: World, exclude: set[int]) -> list[int]:
    found = []
    for pid in all_pids():
        if pid in exclude:
            continue
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm == "faultvictim" and process_uid_and_parent(pid) is not None:  # not a zombie
            found.append(pid)
    return found


def kill_next_evaluation(world: World, target: str, exclude: set[int]) -> int:
    """Wait for the next slow evaluation's process; SIGKILL it (``child``) or its worker."""
    deadline = time.monotonic() + 20
    while not (found := victims(world, exclude)):
        assert time.monotonic() < deadline, "the evaluation never started"
        time.sleep(0.005)
    victim = found[0]
    parent = process_uid_and_parent(victim)
    assert parent is not None
    os.kill(victim if target == "child" else parent[1], signal.SIGKILL)
    return victim


def submit_in_background(world: World, episode: str) -> tuple[threading.Thread, list[dict]]:
    replies: list[dict] = []
    thread = threading.Thread(
        target=lambda: replies.append(
            post(world, "/step", {"episode_id": episode, "action": {"action_type": "SUBMIT"}})
        )
    )
    thread.start()
    return thread, replies


def wait_healthy(world: World) -> dict:
    deadline = time.monotonic() + 20
    while True:
        response = httpx.get(f"{world.server.url}/health", timeout=30)
        if response.status_code == 200:
            return response.json()
        assert time.monotonic() < deadline, response.text
        time.sleep(0.05)


@pytest.mark.parametrize("target", ["worker", "child"])
def test_a_fault_during_submit_is_retried_and_not_scored(world: World, target: str):
    faults = wait_healthy(world)["sandbox"]["faults"]
    episode = f"fault-once-{target}"
    post(world, "/reset", {"task_id": TASK, "episode_id": episode})
    replace_all(world, episode, SLOW_CORRECT)
    thread, replies = submit_in_background(world, episode)
    kill_next_evaluation(world, target, set())
    thread.join()
    obs = replies[0]["observation"]
    assert replies[0]["done"] is True and obs["last_action_error"] is None
    assert obs["solved"] is True and obs["score"] == 1.0  # the retry graded the correct code
    facts = wait_healthy(world)
    assert facts["sandbox"]["faults"] == faults + 1
    assert facts["sandbox"]["workers_alive"] == facts["sandbox"]["workers"]
    canary_check(world)


def test_a_fault_on_the_retry_too_leaves_the_episode_open(world: World):
    episode = "fault-twice"
    post(world, "/reset", {"task_id": TASK, "episode_id": episode})
    before = replace_all(world, episode, SLOW_CORRECT)["observation"]["step_count"]
    thread, replies = submit_in_background(world, episode)
    first = kill_next_evaluation(world, "child", set())
    kill_next_evaluation(world, "worker", {first})
    thread.join()
    reply = replies[0]
    obs = reply["observation"]
    assert "sandbox fault" in obs["last_action_error"], obs["last_action_error"]
    assert "not counted" in obs["last_action_error"]
    assert reply["done"] is False and reply["reward"] == 0.0 and obs["score"] is None
    assert obs["step_count"] == before  # no step taken, no penalty
    wait_healthy(world)
    final = post(world, "/step", {"episode_id": episode, "action": {"action_type": "SUBMIT"}})
    assert final["done"] is True and final["observation"]["solved"] is True
    canary_check(world)
