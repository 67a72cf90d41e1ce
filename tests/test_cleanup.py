"""Cleanup that no tree can defeat, stale roots that never block a start, and a /health that
tells the truth about the sandbox workers (issue 10, item 1)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess
from tracefix_rl.procs import children_of
from tracefix_rl.sandbox.cleanup import remove_tree

DEPTH = 20_000  # far past Python's recursion limit and PATH_MAX


def build_hostile_tree(top: Path, victim: Path, depth: int = DEPTH) -> None:
    """A chain ``depth`` directories deep, with files, symlinks out of the tree, a FIFO,
    and directories the owner can neither read nor enter, built with descriptors (its paths
    are longer than PATH_MAX)."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    for level in range(depth):
        os.mkdir("d", dir_fd=fd)
        if level % 2000 == 0:
            os.symlink(victim, "to-victim", dir_fd=fd)
            os.symlink(victim / "keep.txt", "to-file", dir_fd=fd)
            os.mkfifo("fifo", dir_fd=fd)
            for name in ("a", "b"):
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        child = os.open("d", os.O_RDONLY, dir_fd=fd)
        if level % 3000 == 1:
            os.fchmod(fd, 0)  # finished with it: now not even its owner may list or enter it
        os.close(fd)
        fd = child
    os.close(fd)


def victim_dir(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep me")
    return victim


def test_remove_tree_survives_depth_links_and_permissions(tmp_path):
    victim = victim_dir(tmp_path)
    build_hostile_tree(tmp_path / "tree", victim)
    assert remove_tree(str(tmp_path / "tree"))
    assert not (tmp_path / "tree").exists()
    assert (victim / "keep.txt").read_text() == "keep me"  # links were not followed


def test_remove_tree_edge_cases(tmp_path):
    victim = victim_dir(tmp_path)
    assert remove_tree(str(tmp_path / "missing"))
    (tmp_path / "link").symlink_to(victim)
    assert remove_tree(str(tmp_path / "link"))  # the link goes, not what it points to
    assert (victim / "keep.txt").exists()
    locked = tmp_path / "locked"
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "f").write_text("x")
    os.chmod(locked / "inner", 0)
    os.chmod(locked, stat.S_IRUSR)
    assert remove_tree(str(locked)) and not locked.exists()
    clash = tmp_path / "clash"
    (clash / ".tracefix-rm-1" / "x").mkdir(parents=True)  # the names hoisting picks
    (clash / "a" / "b" / "c").mkdir(parents=True)
    assert remove_tree(str(clash)) and not clash.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to uid 1000 needs root")
def test_remove_tree_as_an_unprivileged_owner():
    """Without root's CAP_DAC_OVERRIDE, permission bits the owner set must not block it."""
    tmp_path = Path(tempfile.mkdtemp(prefix="tracefix-cleanup-"))  # pytest's is root-only
    os.chmod(tmp_path, 0o777)
    victim = victim_dir(tmp_path)
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from pathlib import Path\n"
        "from tests.test_cleanup import build_hostile_tree\n"
        "from tracefix_rl.sandbox.cleanup import remove_tree\n"
        "top = Path(sys.argv[2]) / 'tree'\n"
        "build_hostile_tree(top, Path(sys.argv[3]), depth=3000)\n"
        "print(remove_tree(str(top)), top.exists())\n"
    )
    repo = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run(
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", sys.executable, "-c",
         script, repo, str(tmp_path), str(victim)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    remove_tree(str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]


def test_stale_roots_never_block_a_start(tmp_path):
    victim = victim_dir(tmp_path)
    base = tmp_path / "sandbox"
    base.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names a stale root: a crashed server's
    stale = base / f"{dead.pid}-crashed"
    stale.mkdir()
    (base / f"{dead.pid}-crashed.lock").touch()  # its lock died with it
    build_hostile_tree(stale / "w1", victim)
    os.chmod(stale, 0o500)
    old = base / f"{dead.pid}-unlocked"  # a root from before roots had locks, long ago
    (old / "w1").mkdir(parents=True)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    alive = base / f"{os.getpid()}-running"  # a root of a server that is still running
    (alive / "w1").mkdir(parents=True)
    (base / "not-a-root").write_text("someone else's file")
    server = ServerProcess(extra_env={"SANDBOX_ROOT": str(base), "SANDBOX_WORKERS": "2"})
    try:
        assert httpx.get(f"{server.url}/health").json()["status"] == "healthy"
        deadline = time.monotonic() + 60  # the sweep runs in the background
        while stale.exists() or old.exists():
            assert time.monotonic() < deadline, "the stale root was never removed"
            time.sleep(0.1)
        assert not (base / f"{dead.pid}-crashed.lock").exists()
        assert (alive / "w1").is_dir() and (base / "not-a-root").exists()
        assert (victim / "keep.txt").read_text() == "keep me"
        body = {"task_id": "sum_of_evens_wrong_modulus", "episode_id": "after-sweep"}
        assert httpx.post(f"{server.url}/reset", json=body).status_code == 200
    finally:
        server.stop()


def test_a_root_whose_owner_lives_is_never_swept_whatever_its_pid(tmp_path):
    """Ownership is the lock, not the pid: from a container's PID namespace every server
    outside it looks dead, and a server started there once swept the live root of the
    test process (issue 11)."""
    import fcntl

    base = tmp_path / "sandbox"
    base.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # the pid a server in another PID namespace would seem to have
    lock = os.open(base / f"{dead.pid}-elsewhere.lock", os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    (base / f"{dead.pid}-elsewhere" / "w1").mkdir(parents=True)
    try:
        from tracefix_rl.sandbox.pool import _sweep_stale_roots

        _sweep_stale_roots(str(base), own_root="")
        assert (base / f"{dead.pid}-elsewhere" / "w1").is_dir()
        os.close(lock)  # the owner ends: now it is stale
        lock = -1
        _sweep_stale_roots(str(base), own_root="")
        assert list(base.iterdir()) == []
    finally:
        if lock >= 0:
            os.close(lock)


def test_an_unusable_sandbox_root_falls_back(tmp_path):
    base = tmp_path / "not-a-directory"
    base.write_text("a file where the sandbox root should be")
    server = ServerProcess(extra_env={"SANDBOX_ROOT": str(base), "SANDBOX_WORKERS": "1"})
    try:
        assert httpx.get(f"{server.url}/health").json()["status"] == "healthy"
        assert "using" in server.log() and str(base) in server.log()
    finally:
        server.stop()


def workers_of(server: ServerProcess) -> list[int]:
    return children_of(server.proc.pid)


def test_health_is_truthful_while_workers_are_replaced():
    server = ServerProcess(extra_env={"SANDBOX_WORKERS": "2"})
    try:
        for worker in workers_of(server):
            os.kill(worker, signal.SIGKILL)
        seen_unhealthy, deadline = [], time.monotonic() + 30
        while True:
            response = httpx.get(f"{server.url}/health", timeout=10)
            facts = response.json()
            if response.status_code == 200:
                assert facts["sandbox"]["workers_alive"] == facts["sandbox"]["workers"]
                if seen_unhealthy:
                    break
            else:
                assert response.status_code == 503 and facts["status"] == "unhealthy"
                assert "sandbox workers are alive" in facts["reason"], facts
                seen_unhealthy.append(facts["reason"])
            assert time.monotonic() < deadline, "the workers were never replaced"
        assert facts["sandbox"]["respawns"] >= 2
        body = {"task_id": "sum_of_evens_wrong_modulus", "episode_id": "after-respawn"}
        client = httpx.Client(base_url=server.url, timeout=60)
        assert client.post("/reset", json=body).status_code == 200
        run = client.post("/step", json={"episode_id": "after-respawn",
                                          "action": {"action_type": "RUN_TESTS"}})  # fmt: skip
        assert run.status_code == 200 and run.json()["observation"]["tests_total"] == 4
    finally:
        server.stop()


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/unshare").exists(),
                    reason="a PID namespace needs root and unshare")  # fmt: skip
def test_as_pid_1_the_server_reaps_the_orphans_of_a_dead_worker():
    """In a container without an init the server is PID 1: the children of a worker that
    dies become its children, and must not stay behind as zombies."""
    server = ServerProcess(
        extra_env={"SANDBOX_WORKERS": "2"},
        argv=["/usr/bin/unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m",
              "tracefix_rl.server.app"],
    )  # fmt: skip
    try:
        (inner,) = children_of(server.proc.pid)  # unshare's child: PID 1 in its namespace
        workers = children_of(inner)
        assert len(workers) == 2
        (waiting,) = children_of(workers[0])
        os.kill(workers[0], signal.SIGKILL)  # its waiting child dies too (parent-death signal)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{workers[0]}").exists():  # the supervisor reaps the worker
            assert time.monotonic() < deadline
            time.sleep(0.05)
        while Path(f"/proc/{waiting}").exists():  # re-parented to PID 1, then reaped by it
            assert time.monotonic() < deadline, (waiting, zombies_of(inner))
            time.sleep(0.05)
        assert zombies_of(inner) == []
        while len(children_of(inner)) < 2:  # and the dead worker was replaced
            assert time.monotonic() < deadline, children_of(inner)
            time.sleep(0.05)
        assert httpx.get(f"{server.url}/health", timeout=10).status_code in (200, 503)
    finally:
        server.stop()


def zombies_of(pid: int) -> list[int]:
    found = []
    for child in children_of(pid):
        try:
            if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                found.append(child)
        except OSError:
            pass
    return found
