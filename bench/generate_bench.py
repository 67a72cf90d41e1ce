"""Task generation benchmark: generate and validate the corpus into a temporary file.

    uv run python bench/generate_bench.py

Writes ``bench/results/generate.json`` (tasks kept, seconds, tasks/s) and the registry load
time with the committed corpus (what server start-up pays).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import models  # noqa: E402,F401  (first: keeps gradio out)

# isort: split

from sandbox import get_sandbox  # noqa: E402
from tasks import load_registry  # noqa: E402
from tasks.generate import DEFAULT_PER_PROGRAM, DEFAULT_SEED, generate  # noqa: E402


def main() -> None:
    sandbox = get_sandbox()
    started = time.monotonic()
    registry = load_registry(corpus=None, sandbox=sandbox)
    programs = list(registry.programs().values())
    corpus = generate(programs, sandbox, DEFAULT_SEED, DEFAULT_PER_PROGRAM)
    generation_s = time.monotonic() - started
    started = time.monotonic()
    loaded = load_registry(sandbox=sandbox)
    load_s = time.monotonic() - started
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "corpus.jsonl").write_text("".join(json.dumps(e) + "\n" for e in corpus))
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "programs": len(programs),
        "generated": len(corpus),
        "generation_and_validation_s": round(generation_s, 1),
        "tasks_per_second": round(len(corpus) / generation_s, 1),
        "registry_load_with_corpus_s": round(load_s, 2),
        "registry_tasks": len(loaded.tasks),
    }
    out = REPO / "bench" / "results" / "generate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    sandbox.close()


if __name__ == "__main__":
    main()
