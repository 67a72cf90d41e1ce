"""No evaluation's address space holds anything from another evaluation (issue 10, item 2).

Seen from outside, as root: after evaluations whose code, tests, labels and results carry
unique markers, no byte of any worker process, nor of the child each worker keeps waiting,
holds a marker. The scanner is shown to work on a child that is running an evaluation: it
finds that evaluation's own marker there. (Seen from inside, by agent code scanning its own
memory, is the ``memory_holds_nothing_of_other_evaluations`` payload of the payload suite.)
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid

import pytest

from tracefix_rl.procs import children_of
from tracefix_rl.sandbox import EvalRequest, ZygotePool

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="reading another process's memory needs root (workers are non-dumpable)",
)
MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (r)")


def memory_holds(pid: int, needles: list[bytes]) -> set[bytes]:
    """The needles found anywhere in the readable memory of process ``pid``."""
    found: set[bytes] = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as memory:
        for line in maps:
            match = MAPPING.match(line)
            if not match or "[vvar" in line or "[vsyscall]" in line:
                continue
            start, end = int(match[1], 16), int(match[2], 16)
            try:
                memory.seek(start)
                data = memory.read(end - start)
            except OSError:
                continue
            found |= {needle for needle in needles if needle in data}
    return found


def test_no_worker_or_waiting_child_holds_anything_of_past_evaluations(tmp_path):
    pool = ZygotePool(root=str(tmp_path), workers=2)
    try:
        marks = {name: f"{name.upper()}-{uuid.uuid4().hex}" for name in
                 ("code", "visible", "hidden", "label", "result", "output")}  # fmt: skip
        code = (
            f"SECRET = '{marks['code']}'\n"
            f"print('{marks['output']}')\n"
            "def f(x):\n"
            f"    return '{marks['result'][:8]}' + '{marks['result'][8:]}' + str(x)\n"
        )
        tests = (f"f(1)  # {marks['visible']}", f"f(2)  # {marks['hidden']}")
        for _ in range(6):  # every worker serves some of them
            result = pool.run(EvalRequest(code=code, tests=tests, labels=(marks["label"],) * 2))
            assert result.records[0]["v"] == marks["result"] + "1"
        needles = [mark.encode() for mark in marks.values()]
        assert len(pool._workers) == 2
        for worker in pool._workers:
            # the child the worker forked for the next request, once it has been handed over
            waiting = worker.ready_child(time.monotonic() + 5).pid
            assert children_of(worker.proc.pid) == [waiting]
            for pid in (worker.proc.pid, waiting):
                assert memory_holds(pid, needles) == set(), pid
    finally:
        pool.close()


def test_the_scan_finds_a_running_evaluations_own_data(tmp_path):
    """The positive control: the same scan sees a marker where it really is."""
    pool = ZygotePool(root=str(tmp_path), workers=1)
    try:
        mark = f"RUNNING-{uuid.uuid4().hex}"
        code = f"import time\nSECRET = '{mark}'\ntime.sleep(1.0)\n"
        runner = threading.Thread(target=pool.run, args=(EvalRequest(code=code, tests=("1",)),))
        runner.start()
        while pool.describe()["in_flight"] == 0:
            time.sleep(0.01)
        time.sleep(0.3)  # the child has read its request and is sleeping
        (child,) = children_of(pool._workers[0].proc.pid)
        assert memory_holds(child, [mark.encode()]) == {mark.encode()}
        assert memory_holds(pool._workers[0].proc.pid, [mark.encode()]) == set()
        runner.join()
    finally:
        pool.close()
