"""The README works for a new user: its first screen gives the two set-up commands, then a
30-second episode whose curl block and Python snippet, pasted as they are (but the server's
URL) against a fresh server, solve the task and print what the README says they print; the
protocol page's cookie-jar example works too; and every intra-repo link and ``#anchor`` in
README.md and docs/*.md resolves."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, ServerProcess

README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_URL = "http://localhost:8000"  # what the examples target, as pasted
SOLVED = "score=1.000 solved=true"
RUN_TIMEOUT_S = 120
FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,}).*?^[ \t]*\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def marked_block(path: Path, name: str, language: str = "") -> str:
    """The fenced block between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    text = path.read_text()
    found = re.search(
        rf"<!-- {name}:begin -->\n```{language}\n(.*?)```\n<!-- {name}:end -->", text, re.S
    )
    assert found, f"{path.relative_to(REPO)} lost its {name} block"
    return found.group(1)


def pasted(block: str, url: str) -> str:
    """``block`` as a user pastes it, but aimed at ``url``: the one substitution made."""
    assert "localhost:8000" in block
    return block.replace(README_URL, url).replace("localhost:8000", url.split("://", 1)[1])


def run_shell(script: str, cwd: Path) -> subprocess.CompletedProcess:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                         text=True, timeout=RUN_TIMEOUT_S, cwd=cwd, env=env)  # fmt: skip
    assert run.returncode == 0 and not run.stderr, (run.returncode, run.stderr, run.stdout)
    return run


@pytest.fixture(scope="module")
def fresh_server() -> Iterator[ServerProcess]:
    proc = ServerProcess()
    yield proc
    logged = proc.log()
    proc.stop()
    assert "Traceback" not in logged, logged[-3000:]


def test_the_first_screen_gives_the_set_up_commands_then_a_30_second_episode():
    body = README.read_text().split("---\n", 2)[2]
    sections = body.split("\n## ")
    assert "uv run server" in sections[0] and "uv run pytest" in sections[0]
    assert sections[1].startswith("Play an episode in 30 seconds\n")
    for marker in ("quickstart-curl", "quickstart-output", "quickstart-python"):
        assert f"<!-- {marker}:begin -->" in sections[1], marker


def test_the_quickstart_curl_block_solves_the_task(fresh_server, tmp_path):
    block = marked_block(README, "quickstart-curl", "sh")
    assert '"task_id": "sum_of_evens_wrong_modulus"' in block
    run = run_shell(pasted(block, fresh_server.url), tmp_path)
    assert run.stdout.splitlines()[-1].endswith(SOLVED), run.stdout
    assert run.stdout == marked_block(README, "quickstart-output"), run.stdout


def test_the_quickstart_python_snippet_solves_the_task(fresh_server, tmp_path):
    snippet = marked_block(README, "quickstart-python", "python")
    assert 'task_id="sum_of_evens_wrong_modulus"' in snippet
    play = tmp_path / "play.py"
    play.write_text(pasted(snippet, fresh_server.url))
    run = subprocess.run([sys.executable, str(play)], capture_output=True, text=True,
                         timeout=RUN_TIMEOUT_S, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1].endswith(SOLVED), run.stdout
    assert lines[-2].startswith("reward: ") and float(lines[-2].split()[1]) > 1, run.stdout
    # the same episode as the curl block, so the same text, with the reward line besides
    assert lines[:-2] + lines[-1:] == marked_block(README, "quickstart-output").splitlines()


def test_the_protocol_pages_cookie_jar_example_solves_the_task(fresh_server, tmp_path):
    block = marked_block(DOCS / "protocol.md", "protocol-curl", "sh")
    run = run_shell(pasted(block, fresh_server.url), tmp_path)
    reset, replaced, submitted, state = (json.loads(line) for line in run.stdout.splitlines())
    assert reset["observation"]["task_id"] == "sum_of_evens_wrong_modulus"
    assert replaced["observation"]["last_action_error"] is None
    assert submitted["done"] and submitted["observation"]["solved"] is True
    assert state["episode_id"] == reset["observation"]["episode_id"] and state["done"]


# -- links ---------------------------------------------------------------------------------------


def prose(path: Path) -> str:
    """The Markdown of ``path`` without its fenced code blocks."""
    return FENCE.sub("", path.read_text())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (code spans and link texts kept), lower case,
    without punctuation, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(prose(path)):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    text = prose(path)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    # code spans may hold brackets, but never a link; link texts may hold code spans
    text = CODE_SPAN.sub(lambda span: "x" * len(span.group()), text)
    return LINK.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_link_and_anchor_resolves(page: Path):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_relative_to(REPO) or not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{target}: no such anchor")
    assert not broken, broken


def test_the_readme_links_every_docs_page():
    linked = {target.partition("#")[0] for target in links(README)}
    assert {f"docs/{page.name}" for page in DOCS.glob("*.md")} <= linked
