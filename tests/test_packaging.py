"""Packaging facts the README and the deployment targets rely on."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib

import httpx
import pytest
import yaml

from tests.conftest import REPO, ServerProcess
from tracefix_rl.episode.reward import REWARD_RANGE
from tracefix_rl.tasks import TaskRegistry

TEST_COMMAND = "uv run pytest"
MANIFEST_TASK = "sum_of_evens_wrong_modulus"


def front_matter() -> dict:
    text = (REPO / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_readme_front_matter_and_first_screen():
    meta = front_matter()
    assert meta["sdk"] == "docker" and meta["app_port"] == 8000 and meta["base_path"] == "/web"
    assert {"openenv", "reinforcement-learning", "software-engineering"} <= set(meta["tags"])
    body = (REPO / "README.md").read_text().split("---\n", 2)[2]
    first_screen = body.split("\n## ")[0]
    commands = [
        line.split("#")[0].strip() for line in first_screen.splitlines() if line.startswith("uv ")
    ]
    assert commands == ["uv run server", TEST_COMMAND]


def test_ci_runs_the_readme_test_command():
    script = (REPO / ".ci" / "run").read_text()
    assert TEST_COMMAND in script.splitlines()
    assert "pip install" in script and "uv" in script


def test_manifest(registry: TaskRegistry):
    manifest = yaml.safe_load((REPO / "openenv.yaml").read_text())
    expected = {
        "spec_version": 1,
        "name": "tracefix_rl",
        "type": "space",
        "runtime": "fastapi",
        "app": "server.app:app",
        "port": 8000,
    }
    assert {k: manifest[k] for k in expected} == expected
    tiers = set()
    for entry in manifest["tasks"]:
        task = registry.tasks[entry["id"]]
        assert task.difficulty == entry["difficulty"]
        assert entry["grader"]["type"] == "deterministic"
        tiers.add(entry["difficulty"])
    assert tiers == {"easy", "medium", "hard"}
    validation = manifest["validation"]
    assert tuple(validation["reward"]["range"]) == REWARD_RANGE
    assert validation["capabilities"]["verifier"]["kind"] == "reward_channel"
    assert validation["types"]["tags"]


def test_the_repository_root_is_the_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["server"] == "tracefix_rl.server.app:main"
    setuptools = project["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"tracefix_rl": "."}
    top = [p.parent for p in REPO.glob("*/__init__.py") if p.parent.name != "tests"]
    folders = [f for t in top for f in (t, *(p.parent for p in t.rglob("*/__init__.py")))]
    subpackages = {".".join(f.relative_to(REPO).parts) for f in folders}
    assert "tasks.importers" in subpackages
    assert set(setuptools["packages"]) == {"tracefix_rl"} | {
        f"tracefix_rl.{n}" for n in subpackages
    }
    deps = " ".join(project["project"]["dependencies"])
    assert "openenv>=0.10,<0.11" in deps and "openenv-core" not in deps
    assert "fastmcp>=3,<4" in deps
    app = ast.parse((REPO / "server" / "app.py").read_text())
    guard = [n for n in app.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    assert guard and "main()" in ast.unparse(guard[0].body[0])
    from openenv.cli._cli_utils import validate_env_structure

    validate_env_structure(REPO)  # what `openenv push` checks first: raises if a file is missing


def test_the_wheel_installs_imports_and_serves(tmp_path):
    """``uv build`` makes a wheel that, installed into a fresh environment, holds the package
    and its task data and serves episodes (outside this checkout)."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed")
    built = subprocess.run([uv, "build", "--wheel", "-o", str(tmp_path / "dist"), str(REPO)],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("tracefix_rl-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    installed = subprocess.run(
        [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    probe = (
        "import tracefix_rl, tracefix_rl.tasks as t\n"
        "from tracefix_rl import TraceFixAction, TraceFixEnv\n"
        "print(tracefix_rl.__file__)\n"
        "print(len(list(t.BUILTIN_DIR.glob('*.toml'))), t.GENERATED_CORPUS.exists())\n"
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    location, data = out.stdout.splitlines()
    assert location.startswith(str(venv)) and data == "40 True"
    server = ServerProcess(argv=[str(venv / "bin" / "server")], cwd=tmp_path)
    try:
        reset = httpx.post(f"{server.url}/reset", json={"task_id": MANIFEST_TASK}, timeout=30)
        assert reset.status_code == 200 and reset.json()["observation"]["task_id"] == MANIFEST_TASK
        assert httpx.get(f"{server.url}/health").json()["tasks"] == 1240
    finally:
        server.stop()


def test_dockerfile_essentials():
    text = (REPO / "Dockerfile").read_text()
    for fragment in (
        "FROM python:3.11-slim",
        "--uid 1000",
        "USER 1000",
        "uv sync --frozen",
        "EXPOSE 8000",
        "HEALTHCHECK",
        "/health",
        "ENABLE_WEB_INTERFACE=true",
    ):
        assert fragment in text, fragment


def test_web_interface_serves_playground_and_stateful_http(start_server):
    proc = start_server(extra_env={"ENABLE_WEB_INTERFACE": "true"})
    assert httpx.get(f"{proc.url}/web/", timeout=30).status_code == 200
    with httpx.Client(base_url=proc.url, timeout=30) as client:  # keeps /reset's cookie
        reset = client.post("/reset", json={"seed": 1, "episode_id": "web-1"})
        step = client.post("/step", json={"action": {"action_type": "VIEW_CODE"}})
    assert reset.status_code == step.status_code == 200
    assert step.json()["observation"]["episode_id"] == "web-1"
    assert step.json()["observation"]["step_count"] == 1


@pytest.mark.slow
def test_openenv_010_static_validation(tmp_path):
    """The newer validator generation (openenv 0.10, separate venv) accepts the manifest."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed")
    venv = tmp_path / "oe10"
    subprocess.run([uv, "venv", "-q", str(venv)], check=True)
    subprocess.run(
        [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "openenv==0.10.0"],
        check=True,
        timeout=900,
    )
    done = subprocess.run(
        [str(venv / "bin" / "openenv"), "validate", "--level", "static", "--skip-build"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS  static.manifest" in done.stdout
