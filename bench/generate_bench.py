"""Task generation benchmark: generate and validate the corpus in memory (the committed
corpus is left alone).

    uv run python bench/generate_bench.py

Writes ``bench/results/generate.json`` (or into ``--results DIR``): tasks kept, seconds,
tasks/s, and the registry load time with the committed corpus (what server start-up pays).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import RESULTS, add_results_option, write_result

from tracefix_rl import models  # noqa: F401  (before openenv: keeps gradio out)

# isort: split

from tracefix_rl.sandbox import get_sandbox
from tracefix_rl.tasks import load_registry
from tracefix_rl.tasks.generate import DEFAULT_PER_PROGRAM, DEFAULT_SEED, generate


def run(results: Path = RESULTS) -> dict:
    """Generate and validate the corpus from scratch; write and return the report."""
    sandbox = get_sandbox()
    started = time.monotonic()
    registry = load_registry(corpus=None, sandbox=sandbox)
    programs = list(registry.programs().values())
    corpus = generate(programs, sandbox, DEFAULT_SEED, DEFAULT_PER_PROGRAM)
    generation_s = time.monotonic() - started
    started = time.monotonic()
    loaded = load_registry(sandbox=sandbox)
    load_s = time.monotonic() - started
    report = write_result("generate", {
        "programs": len(programs),
        "generated": len(corpus),
        "generation_and_validation_s": round(generation_s, 1),
        "tasks_per_second": round(len(corpus) / generation_s, 1),
        "registry_load_with_corpus_s": round(load_s, 2),
        "registry_tasks": len(loaded.tasks),
        "target_s": 60.0,
    }, results)  # fmt: skip
    sandbox.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_results_option(parser)
    print(json.dumps(run(parser.parse_args().results), indent=2))


if __name__ == "__main__":
    main()
