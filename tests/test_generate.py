"""The generated corpus: mutation operators, determinism, dedupe, validation, tiers, splits,
the command line, and imported packs in the style of public benchmarks."""

from __future__ import annotations

import ast
import json
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import REPO
from tracefix_rl.environment import TraceFixEnvironment
from tracefix_rl.models import TraceFixAction
from tracefix_rl.sandbox import get_sandbox
from tracefix_rl.tasks import TaskRegistry, load_registry, split_of
from tracefix_rl.tasks.generate import (
    BUG_TYPES,
    _rejection,
    apply,
    difficulty_points,
    find_sites,
    generate,
    normalized,
    read_corpus,
    tier_of,
)
from tracefix_rl.tasks.oracle import buggy_verdict
from tracefix_rl.tasks.sources import GENERATED_CORPUS

SAMPLE = ["lru_cache_get_does_not_promote", "merge_sort_wrong_tail_index",
          "sum_of_evens_wrong_modulus"]  # fmt: skip


def programs(registry: TaskRegistry, ids=SAMPLE):
    return [registry.tasks[i] for i in ids]


def test_every_mutation_kind_applies_and_parses(registry: TaskRegistry):
    """Each kind changes some program into code that still parses (a site may be a no-op,
    e.g. ``return None`` -> ``return None``; the generator drops those as duplicates)."""
    effective = set()
    rng = random.Random(0)
    for program in registry.programs().values():
        original = normalized(program.solution)
        for site in find_sites(ast.parse(program.solution)):
            if site.kind in effective:
                continue
            mutated = apply(program.solution, site, rng)
            if mutated is not None and normalized(mutated) != original:
                ast.parse(mutated)
                effective.add(site.kind)
    assert effective == set(BUG_TYPES)


def test_mutations_keep_comments_and_formatting(registry: TaskRegistry):
    program = registry.tasks["sum_of_evens_wrong_modulus"]
    site = next(s for s in find_sites(ast.parse(program.solution)) if s.kind == "comparison")
    mutated = apply(program.solution, site, random.Random(0))
    assert '"""Return the sum of the even numbers in nums."""' in mutated
    assert "n % 2 != 0" in mutated


def test_generation_is_deterministic_and_deduplicated(registry: TaskRegistry):
    sandbox = get_sandbox()
    first = generate(programs(registry), sandbox, seed=7, per_program=6)
    second = generate(programs(registry), sandbox, seed=7, per_program=6)
    other = generate(programs(registry), sandbox, seed=8, per_program=6)
    assert first == second and first != other
    assert len(first) == 18
    keys = [normalized(entry["buggy_code"]) for entry in first]
    solutions = {normalized(p.solution) for p in programs(registry)}
    assert len(set(keys)) == len(keys) and not set(keys) & solutions
    assert len({entry["task_id"] for entry in first}) == len(first)


def test_invalid_mutants_are_rejected(registry: TaskRegistry):
    program = registry.tasks["sum_of_evens_wrong_modulus"]
    sandbox = get_sandbox()

    def verdict_of(code: str):
        return _rejection(program, buggy_verdict(program, code, sandbox))

    assert verdict_of(program.solution + "\nUNUSED = 1\n") == "buggy code passes every visible test"
    looping = "def sum_of_evens(nums):\n    while True:\n        pass\n"
    assert verdict_of(looping) == "timed out"
    # wrong only for [10, 20, 30] (a hidden test): invisible to the visible tests
    hidden_only = program.solution.replace(
        "    return total", "    return 0 if total == 60 else total"
    )
    assert verdict_of(hidden_only) == "buggy code passes every visible test"
    # wrong only for [] (a visible test): the hidden tests never notice
    visible_only = program.solution.replace("    return total", "    return total if nums else 1")
    assert verdict_of(visible_only) == "buggy code passes every hidden test"
    assert verdict_of(program.buggy_code) is None


def test_committed_corpus_meets_the_targets(registry: TaskRegistry):
    header, entries = read_corpus(GENERATED_CORPUS)
    assert header["count"] == len(entries) >= 1000
    generated = [registry.tasks[i] for i in registry.ids(source="generated")]
    assert len(generated) == len(entries)  # none stale
    assert {t.difficulty for t in generated} == {"easy", "medium", "hard"}
    assert {t.split for t in generated} == {"train", "eval"}
    for task in generated:
        assert tier_of(task.features) == task.difficulty
        assert task.expected == registry.programs()[task.program].expected


def test_tiers_order_by_their_features(registry: TaskRegistry):
    generated = [registry.tasks[i] for i in registry.ids(source="generated")]

    def mean(tier: str, key) -> float:
        values = [key(t.features) for t in generated if t.difficulty == tier]
        return sum(values) / len(values)

    for key in (difficulty_points, lambda f: f["edits"], lambda f: f["fix_lines"]):
        assert mean("easy", key) < mean("medium", key) < mean("hard", key)


def test_splits_are_disjoint_by_program(registry: TaskRegistry):
    programs_by_split = defaultdict(set)
    for task in registry.tasks.values():
        programs_by_split[task.split].add(task.program)
        assert task.split == split_of(task.program)
    assert programs_by_split["train"] and programs_by_split["eval"]
    assert not programs_by_split["train"] & programs_by_split["eval"]
    assert split_of("sum_of_evens_wrong_modulus") == split_of("sum_of_evens_wrong_modulus")


def test_reset_samples_by_tier_and_split(registry: TaskRegistry):
    env = TraceFixEnvironment(registry=registry)
    first = env.reset(seed=11, difficulty="medium", split="eval")
    task = registry.tasks[first.task_id]
    assert (task.difficulty, task.split) == ("medium", "eval")
    again = TraceFixEnvironment(registry=registry).reset(seed=11, difficulty="medium",
                                                         split="eval")  # fmt: skip
    assert again.task_id == first.task_id


def test_generated_task_is_playable(registry: TaskRegistry):
    task = registry.tasks[registry.ids(source="generated", difficulty="hard")[0]]
    env = TraceFixEnvironment(registry=registry)
    obs = env.reset(task_id=task.task_id)
    assert obs.description == task.description
    assert [obs.code_dict[i] for i in sorted(obs.code_dict)] == task.buggy_code.rstrip("\n").split(
        "\n"
    )
    obs = env.step(TraceFixAction(action_type="REPLACE_LINES", start_line=1,
                                  end_line=len(obs.code_dict),
                                  new_code_block=task.solution.rstrip("\n")))  # fmt: skip
    obs = env.step(TraceFixAction(action_type="SUBMIT"))
    assert obs.solved and obs.score == 1.0


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracefix_rl.tasks", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip


def test_cli_validate_passes_over_the_whole_corpus():
    done = run_cli("validate", "--json")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["valid"] >= 1040 and report["invalid"] == []


def test_cli_stats_list_and_export_round_trip(tmp_path: Path):
    stats = json.loads(run_cli("stats", "--json").stdout)
    assert stats["by_source"]["curated"] >= 40 and stats["by_source"]["generated"] >= 1000
    assert set(stats["by_tier"]) == {"easy", "medium", "hard"}
    assert set(stats["by_split"]) == {"train", "eval"} and stats["total"] == sum(
        stats["by_tier"].values()
    )
    rows = json.loads(run_cli("list", "--json", "--split", "eval", "--difficulty", "easy").stdout)
    assert rows and all(r["split"] == "eval" and r["difficulty"] == "easy" for r in rows)
    export = tmp_path / "curated.jsonl"
    run_cli("export", "--source", "curated", "--output", str(export))
    pack = [json.loads(line) for line in export.read_text().splitlines()]
    renamed = [{**entry, "task_id": "copy-" + entry["task_id"]} for entry in pack]
    export.write_text("".join(json.dumps(e) + "\n" for e in renamed))
    reloaded = load_registry(str(export), corpus=None)
    assert reloaded.problems == [] and len(reloaded.ids(source="curated")) == 2 * len(pack)


# -- packs in the style of public benchmarks (our own examples) --------------------------------

QUIXBUGS_LIKE = {
    "task_id": "pack-gcd",
    "difficulty": "easy",
    "description": "gcd(a, b): the greatest common divisor of two non-negative ints, "
                   "gcd(a, 0) == a.",
    "entry_point": "gcd",
    "buggy_code": "def gcd(a, b):\n    if b == 0:\n        return a\n    return gcd(a % b, b)\n",
    "solution": "def gcd(a, b):\n    if b == 0:\n        return a\n    return gcd(b, a % b)\n",
    "visible_tests": [{"input": [12, 8], "output": 4}, {"input": [17, 0], "output": 17}],
    "hidden_tests": [{"input": [35, 21], "output": 7}, {"input": [0, 9], "output": 9},
                     {"input": [13, 7], "output": 1}],
    "bug_type": "swapped_arguments",
    "source": "quixbugs-like",
}  # fmt: skip

HUMANEVALFIX_LIKE = {
    "task_id": "pack-below-threshold",
    "difficulty": "easy",
    "description": "below_threshold(l, t): True if every number in l is below t.",
    "entry_point": "below_threshold",
    "buggy_code": "def below_threshold(l, t):\n    for e in l:\n        if e >= t:\n"
                  "            return True\n    return False\n",
    "solution": "def below_threshold(l, t):\n    for e in l:\n        if e >= t:\n"
                "            return False\n    return True\n",
    "visible_tests": ["assert candidate([1, 2, 4, 10], 100)", "assert not candidate([1, 20], 5)"],
    "hidden_tests": ["assert candidate([], 0)", "assert not candidate([5], 5)",
                     "assert candidate([1, 8, 4, 10], 11) == True"],
    "bug_type": "inverted_condition",
    "source": "humanevalfix-like",
}  # fmt: skip


def test_benchmark_style_packs_load_validate_and_play(tmp_path: Path):
    pack = tmp_path / "bench.jsonl"
    pack.write_text(json.dumps(QUIXBUGS_LIKE) + "\n" + json.dumps(HUMANEVALFIX_LIKE) + "\n")
    registry = load_registry(str(pack), corpus=None)
    assert registry.problems == []
    gcd = registry.tasks["pack-gcd"]
    assert gcd.visible_tests[0].code == "gcd(12, 8)" and gcd.visible_tests[0].has_given
    below = registry.tasks["pack-below-threshold"]
    assert (
        below.visible_tests[0].code
        == "candidate = below_threshold\nbool(candidate([1, 2, 4, 10], 100))"
    )
    for task in (gcd, below):
        env = TraceFixEnvironment(registry=registry)
        obs = env.reset(task_id=task.task_id)
        assert obs.tests_total == len(task.visible_tests)
        obs = env.step(TraceFixAction(action_type="RUN_TESTS"))
        assert obs.tests_passed < obs.tests_total
        env.step(TraceFixAction(action_type="REPLACE_LINES", start_line=1,
                                end_line=len(obs.code_dict),
                                new_code_block=task.solution.rstrip("\n")))  # fmt: skip
        assert env.step(TraceFixAction(action_type="SUBMIT")).solved


def test_given_outputs_that_disagree_with_the_solution_are_rejected(tmp_path: Path):
    wrong = {**QUIXBUGS_LIKE, "task_id": "pack-gcd-wrong",
             "hidden_tests": [{"input": [35, 21], "output": 5}]}  # fmt: skip
    pack = tmp_path / "wrong.jsonl"
    pack.write_text(json.dumps(wrong) + "\n")
    registry = load_registry(str(pack), corpus=None)
    (problem,) = registry.problems
    assert "solution gives 7" in problem.reason and "task says 5" in problem.reason


@pytest.mark.slow
def test_committed_corpus_is_reproducible(tmp_path: Path):
    header, entries = read_corpus(GENERATED_CORPUS)
    output = tmp_path / "corpus.jsonl"
    done = run_cli("generate", "--seed", str(header["seed"]), "--per-program",
                   str(header["per_program"]), "--output", str(output))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert read_corpus(output)[1] == entries
