"""The first sandbox backend: observations only, limits, cleanup, no secrets."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.conftest import FAKE_SECRET
from tracefix_rl.judge import judge
from tracefix_rl.sandbox import EvalRequest, FairSlots, Limits, SandboxFault, ZygotePool, canonical


@pytest.fixture(scope="module")
def sandbox():
    box = ZygotePool(limits=Limits(wall_s=3.0, per_test_s=1.0, cpu_s=10))
    yield box
    box.close()


def run(box: ZygotePool, code: str, *tests: str, **kw):
    return box.run(EvalRequest(code=code, tests=tests, **kw))


class Sub(int):
    pass


def test_canonical_keeps_exact_types_apart():
    assert canonical(1) == 1 and canonical(True) is True and canonical(1.0) == 1.0
    assert type(canonical(1.0)) is float
    assert canonical((1, 2)) == {"t": "tuple", "v": [1, 2]}
    assert canonical([1, (2,)]) == [1, {"t": "tuple", "v": [2]}]
    assert canonical({3, 1, 2}) == {"t": "set", "v": [1, 2, 3]}
    assert canonical({"b": 1, "a": 2}) == canonical({"a": 2, "b": 1})
    assert canonical(float("nan")) == {"t": "float", "v": "nan"}
    assert canonical(b"\x00\xff") == {"t": "bytes", "v": "00ff"}


def test_canonical_rejects_subclasses_and_objects():
    assert canonical(Sub(3)) == {"t": "unserializable", "v": "Sub"}
    assert canonical([object()])["t"] == "unserializable"
    deep: list = []
    for _ in range(100):
        deep = [deep]
    assert canonical(deep) == {"t": "unserializable", "v": "too deep"}


def test_values_and_exceptions_are_observed(sandbox):
    result = run(sandbox, "def f(x):\n    return 10 // x\n", "f(2)", "f(0)", "x = f(5)")
    assert result.records == [
        {"i": 0, "v": 5},
        {"i": 1, "e": "ZeroDivisionError", "m": "integer division or modulo by zero", "ln": 2},
        {"i": 2, "v": None},
    ]
    assert not result.timed_out


def test_each_test_gets_a_fresh_namespace(sandbox):
    code = "counter = []\ndef add(x):\n    counter.append(x)\n    return len(counter)\n"
    result = run(sandbox, code, "add(1)", "add(1)")
    assert [r["v"] for r in result.records] == [1, 1]


def test_timeout_kills_and_keeps_earlier_records(sandbox):
    start = time.monotonic()
    code = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
    code += "def f(x):\n    if x:\n        while True: pass\n    return 1\n"
    result = run(sandbox, code, "f(0)", "f(1)", "f(0)")
    assert time.monotonic() - start < 3.0 + 2.0
    assert result.timed_out
    assert result.records == [{"i": 0, "v": 1}]


def test_cpu_limit_kills_busy_loops(sandbox):
    limits = Limits(wall_s=10.0, per_test_s=10.0, cpu_s=1)
    code = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True: pass\n"
    result = run(sandbox, code, "1", limits=limits)
    assert result.records == [] and result.signal in (signal.SIGXCPU, signal.SIGKILL)
    assert not result.timed_out and result.duration_ms < 5000


def test_crash_and_exit_leave_missing_records(sandbox):
    crash = run(sandbox, "import ctypes\n", "1", "ctypes.string_at(0)", "2")
    assert [r["i"] for r in crash.records] == [0] and crash.signal == 11
    exited = run(sandbox, "import os\n", "1", "os._exit(0)", "2")
    assert [r["i"] for r in exited.records] == [0] and exited.exit_code == 0
    verdict = judge(exited, [{"v": 1}, {"v": None}, {"v": 2}])
    assert [t.passed for t in verdict.tests] == [True, False, False]


def test_sys_exit_is_an_exception_not_a_pass(sandbox):
    result = run(sandbox, "import sys\n", "sys.exit(0)")
    assert result.records[0]["e"] == "SystemExit"


def test_output_is_captured_with_a_cap(sandbox):
    result = run(sandbox, "print('hello')\n", "print('x' * 10**6)", "1", labels=("a", "b"))
    assert "hello" in result.output and len(result.output) <= Limits().output_bytes
    assert result.records[-1] == {"i": 1, "v": 1}


def test_memory_limit(sandbox):
    result = run(sandbox, "", "len(bytearray(4 * 1024**3))")
    assert result.records[0]["e"] == "MemoryError"


def test_child_environment_has_no_secret(sandbox, monkeypatch):
    monkeypatch.setenv("TRACEFIX_FAKE_SECRET", FAKE_SECRET)
    result = run(sandbox, "import os\n", "dict(os.environ)", "os.getcwd()")
    environ = result.records[0]["v"]["v"]
    assert environ and not any(FAKE_SECRET in str(pair) for pair in environ)
    assert result.records[1]["v"].startswith(sandbox.root)


def test_filesystem_is_read_only_and_nothing_is_left_behind(sandbox):
    code = "import threading, time\nthreading.Thread(target=time.sleep, args=(30,)).start()\n"
    result = run(sandbox, code, "open('f.txt', 'w').write('x')", "import os\nos.mkdir('d')")
    assert [(r["e"], r["m"]) for r in result.records] == [
        ("OSError", "[Errno 30] Read-only file system: 'f.txt'"),
        ("OSError", "[Errno 30] Read-only file system: 'd'"),
    ]
    # one shared, empty working directory per worker; nothing per evaluation
    for worker in os.listdir(sandbox.root):
        assert os.listdir(os.path.join(sandbox.root, worker)) == ["cwd"]
        assert os.listdir(os.path.join(sandbox.root, worker, "cwd")) == []


def test_syntax_error_is_reported_per_test(sandbox):
    result = run(sandbox, "def f(:\n", "f(1)", "2")
    assert [r["e"] for r in result.records] == ["SyntaxError", "SyntaxError"]


def test_a_test_that_does_not_compile_fails_alone(sandbox):
    result = run(sandbox, "def f(x):\n    return x\n", "f(1)", "f(", "f(3)")
    assert [r.get("v", r.get("e")) for r in result.records] == [1, "SyntaxError", 3]


def test_pools_have_separate_roots_and_sweep_dead_ones(tmp_path):
    first = ZygotePool(root=str(tmp_path), workers=1)
    second = ZygotePool(root=str(tmp_path), workers=1)
    assert first.root != second.root
    first.close()
    assert run(second, "", "1").records == [{"i": 0, "v": 1}]
    stale = tmp_path / "999999999-old"  # a root whose owner is gone: its lock is free
    stale.mkdir()
    (tmp_path / "999999999-old.lock").touch()
    third = ZygotePool(root=str(tmp_path), workers=1)
    deadline = time.monotonic() + 30  # the sweep runs in the background
    while stale.exists():
        assert time.monotonic() < deadline, "the stale root was never swept"
        time.sleep(0.05)
    assert os.path.isdir(second.root) and not (tmp_path / "999999999-old.lock").exists()
    second.close()
    third.close()


def test_fair_slots_serve_waiters_in_order():
    import threading

    slots = FairSlots(1)
    assert slots.acquire(timeout=1)
    order: list[int] = []

    def waiter(n: int) -> None:
        assert slots.acquire(timeout=10)
        order.append(n)
        slots.release()

    threads = []
    for n in range(5):
        thread = threading.Thread(target=waiter, args=(n,))
        thread.start()
        threads.append(thread)
        while slots.waiting < n + 1:
            time.sleep(0.001)
    slots.release()
    for thread in threads:
        thread.join()
    assert order == [0, 1, 2, 3, 4]
    assert not FairSlots(0).acquire(timeout=0.05)


def test_worker_killed_while_idle_is_replaced(tmp_path):
    pool = ZygotePool(root=str(tmp_path), workers=1)
    try:
        worker = pool._idle[0]
        worker.proc.kill()
        worker.proc.wait()
        assert run(pool, "", "41 + 1").records == [{"i": 0, "v": 42}]
        assert pool.describe()["respawns"] == 1 and pool.describe()["workers_alive"] == 1
    finally:
        pool.close()


def test_worker_killed_during_evaluation_is_retried_and_replaced(tmp_path):
    pool = ZygotePool(root=str(tmp_path), workers=2)
    try:
        slow = "import time\ntime.sleep(0.5)\ndef f():\n    return 42\n"
        outcome: list = []
        runner = threading.Thread(target=lambda: outcome.append(run(pool, slow, "f()")))
        runner.start()
        while pool.describe()["in_flight"] == 0:
            time.sleep(0.005)
        time.sleep(0.1)
        busy = [w for w in pool._workers if w.busy]
        os.kill(busy[0].proc.pid, signal.SIGKILL)  # the sandbox fails, not the agent's code
        runner.join()
        assert outcome[0].records == [{"i": 0, "v": 42}]  # retried on the other worker
        facts = pool.describe()
        assert facts["faults"] == 1
        deadline = time.monotonic() + 10
        while pool.health_problem() is not None:
            assert time.monotonic() < deadline, pool.describe()
            time.sleep(0.02)
        assert pool.describe()["respawns"] == 1
    finally:
        pool.close()


def test_agent_code_that_kills_its_own_worker_with_layers_off(tmp_path):
    # seccomp, the uid drop and Landlock's signal scoping each stop kill(ppid): all off here
    pool = ZygotePool(
        root=str(tmp_path),
        workers=1,
        seccomp=False,
        landlock=False,
        uid_drop=False,
        allow_degraded=True,
    )
    try:
        code = "import os, signal, time\nos.kill(os.getppid(), signal.SIGKILL)\ntime.sleep(1)\n"
        with pytest.raises(SandboxFault, match="retried once, failed again"):
            run(pool, code, "1")
        assert run(pool, "", "2").records == [{"i": 0, "v": 2}]  # waits for the replacement
        facts = pool.describe()
        assert facts["faults"] == 2 and facts["workers_alive"] == facts["workers"] == 1
    finally:
        pool.close()


def test_bounded_queue_refuses_with_a_clear_error(tmp_path):
    import threading

    from tracefix_rl.sandbox import SandboxBusy

    pool = ZygotePool(root=str(tmp_path), workers=1, max_queue=0, queue_timeout_s=5)
    try:
        hog = threading.Thread(target=run, args=(pool, "import time", "time.sleep(1.5)"))
        hog.start()
        while pool.describe()["in_flight"] == 0:
            time.sleep(0.005)
        with pytest.raises(SandboxBusy, match="queue is full"):
            run(pool, "", "1")
        hog.join()
        assert run(pool, "", "1").records == [{"i": 0, "v": 1}]
    finally:
        pool.close()


def test_interrupted_call_replaces_the_worker(tmp_path):
    """An exception mid-request (e.g. Ctrl-C) must not leave a stale answer in the channel."""
    pool = ZygotePool(root=str(tmp_path), workers=1)
    try:
        worker = pool._idle[0]
        original = worker._receive

        def interrupted(deadline):
            raise KeyboardInterrupt

        worker._receive = interrupted
        with pytest.raises(KeyboardInterrupt):
            run(pool, "", "1")
        worker._receive = original
        assert run(pool, "", "2").records == [{"i": 0, "v": 2}]  # not the stale "1"
        assert run(pool, "", "3").records == [{"i": 0, "v": 3}]
        assert pool.describe()["respawns"] == 1  # the interrupted worker was replaced
    finally:
        pool.close()


# -- faults of the sandbox versus failures of the agent's code (issue 10, item 5) -------------


def test_child_killed_from_outside_is_retried(tmp_path):
    pool = ZygotePool(root=str(tmp_path), workers=1)
    try:
        code = (
            "import ctypes, time\n"
            "ctypes.CDLL(None).prctl(15, b'faultvictim', 0, 0, 0)\n"  # PR_SET_NAME: findable
            "time.sleep(0.5)\n"
        )
        outcome: list = []
        runner = threading.Thread(target=lambda: outcome.append(run(pool, code, "7")))
        runner.start()
        victim = None
        while victim is None:
            victim = next((p for p in os.listdir("/proc") if p.isdigit() and _comm(p) ==
                           "faultvictim"), None)  # fmt: skip
        os.kill(int(victim), signal.SIGKILL)
        runner.join()
        assert outcome[0].records == [{"i": 0, "v": 7}]  # the retry's own child ran to the end
        facts = pool.describe()
        assert facts["faults"] == 1 and facts["respawns"] == 0  # the worker itself was fine
    finally:
        pool.close()


def _comm(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return ""


def test_the_agents_own_failures_are_not_faults(sandbox):
    faults = sandbox.describe()["faults"]
    exited = run(sandbox, "import os\n", "os._exit(70)")  # the setup-failure exit code
    assert exited.records == [] and exited.exit_code == 70
    aborted = run(sandbox, "import os\n", "os.abort()")
    assert aborted.records == [] and aborted.signal == signal.SIGABRT
    suicide = run(sandbox, "import os, signal\n", "os.kill(os.getpid(), signal.SIGKILL)",
                  "signal.raise_signal(signal.SIGKILL)")  # fmt: skip
    assert [r["e"] for r in suicide.records] == ["PermissionError", "PermissionError"]
    hard_cpu = run(
        sandbox,
        "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGALRM, signal.SIG_IGN)\n",
        "while True: pass",
        limits=Limits(wall_s=10.0, per_test_s=10.0, cpu_s=1),
    )  # SIGXCPU ignored: the hard limit's SIGKILL ends it, and that is still its CPU limit
    assert hard_cpu.records == [] and hard_cpu.signal == signal.SIGXCPU
    assert not hard_cpu.timed_out
    assert sandbox.describe()["faults"] == faults


def test_cancel_drops_a_queued_evaluation_and_kills_a_running_one(tmp_path):
    from tracefix_rl.sandbox import EvaluationCancelled

    pool = ZygotePool(root=str(tmp_path), workers=1, limits=Limits(wall_s=30, per_test_s=30))
    try:
        running, queued = threading.Event(), threading.Event()
        errors: dict[str, BaseException] = {}

        def call(name: str, cancel: threading.Event) -> None:
            try:
                pool.run(EvalRequest("import time\ntime.sleep(20)", ("1",)), cancel=cancel)
            except BaseException as exc:  # noqa: BLE001
                errors[name] = exc

        threads = [threading.Thread(target=call, args=("running", running))]
        threads[0].start()
        while pool.describe()["in_flight"] == 0:
            time.sleep(0.005)
        threads.append(threading.Thread(target=call, args=("queued", queued)))
        threads[1].start()
        while pool.describe()["queued"] == 0:
            time.sleep(0.005)
        started = time.monotonic()
        queued.set()
        threads[1].join()
        running.set()
        threads[0].join()
        assert time.monotonic() - started < 2  # not the 20 s the code sleeps
        assert all(isinstance(errors[n], EvaluationCancelled) for n in ("running", "queued"))
        assert pool.describe()["cancelled"] == 2
        assert run(pool, "", "5").records == [{"i": 0, "v": 5}]  # the worker serves again
        assert pool.describe()["faults"] == 0
    finally:
        pool.close()
