"""Environment semantics: actions, invalid forms, truncation, determinism, reward."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tracefix_rl.environment import TraceFixEnvironment
from tracefix_rl.episode.editor import UNDO_DEPTH, UNDO_MAX_BYTES, reindent
from tracefix_rl.episode.reward import INVALID_ACTION_PENALTY, REWARD_RANGE, STEP_COST
from tracefix_rl.models import TraceFixAction
from tracefix_rl.tasks import TaskRegistry, TaskSelectionError

TASK = "sum_of_evens_wrong_modulus"


def act(action_type: str, **fields) -> TraceFixAction:
    return TraceFixAction(action_type=action_type, **fields)


@pytest.fixture
def env(make_env) -> TraceFixEnvironment:
    environment = make_env()
    environment.reset(task_id=TASK, episode_id="ep-test")
    return environment


def code_of(obs) -> list[str]:
    return [obs.code_dict[i] for i in sorted(obs.code_dict)]


# -- reset -------------------------------------------------------------------------------


def test_reset_observation(make_env, registry: TaskRegistry):
    obs = make_env().reset(task_id=TASK, episode_id="abc")
    task = registry.tasks[TASK]
    assert obs.task_id == TASK and obs.difficulty == "easy" and obs.episode_id == "abc"
    assert obs.description == task.description
    assert code_of(obs) == task.buggy_code.rstrip("\n").split("\n")
    assert obs.tests_total == len(task.visible_tests) and obs.steps_remaining == 50
    assert obs.reward == 0.0 and not obs.done and obs.last_action_error is None
    assert obs.score is None and obs.solved is None and obs.truncated is None


def test_reset_is_deterministic_and_echoes_episode_id(make_env):
    first = make_env().reset(seed=11, episode_id="same")
    second = make_env().reset(seed=11, episode_id="same")
    assert first.model_dump_json() == second.model_dump_json()
    env = make_env()
    env.reset(seed=11)
    assert len(env.state.episode_id) == 36  # uuid4 when absent


def test_reset_filters_alias_and_errors(make_env):
    env = make_env()
    assert env.reset(task_name=TASK).task_id == TASK
    assert env.reset(seed=3, difficulty="HARD").difficulty == "hard"
    assert env.reset(seed=3, difficulty="easy", prompt="dataset column", foo=1).difficulty == "easy"
    current = env.state.task_id
    with pytest.raises(TaskSelectionError, match="unknown task_id"):
        env.reset(task_id="nope")
    for kwargs in (
        {"difficulty": "extreme"},
        {"seed": -1},
        {"seed": False},
        {"seed": "3"},
        {"max_steps": 0},
        {"task_id": ["a"]},
        {"episode_id": ""},
    ):
        with pytest.raises(ValidationError) as error:
            env.reset(**kwargs)
        assert [e["loc"] for e in error.value.errors()] == [(next(iter(kwargs)),)]
    assert env.state.task_id == current  # a failed reset leaves the last episode alone


def test_step_before_reset_reports_error(make_env):
    obs = make_env().step(act("RUN_TESTS"))
    assert obs.last_action_error == "no episode is running: call reset first"


# -- actions -----------------------------------------------------------------------------


def test_view_code(env):
    obs = env.step(act("VIEW_CODE"))
    assert obs.last_action_error is None and obs.reward == -STEP_COST
    assert "1 | def sum_of_evens(nums):" in obs.localized_context
    obs = env.step(act("VIEW_CODE", start_line=3, end_line=4))
    assert obs.localized_context.splitlines()[0].endswith("3 |     total = 0")
    assert len(obs.localized_context.splitlines()) == 2
    for fields, message in (
        ({"start_line": 0, "end_line": 2}, "outside the file"),
        ({"start_line": 5, "end_line": 99}, "outside the file"),
        ({"start_line": 99}, "start_line 99 is outside the file"),
        ({"end_line": 3}, "end_line given without start_line"),
    ):
        obs = env.step(act("VIEW_CODE", **fields))
        assert message in obs.last_action_error
        assert obs.reward == -(STEP_COST + INVALID_ACTION_PENALTY)


def test_run_tests_reports_visible_results(env):
    obs = env.step(act("RUN_TESTS"))
    assert obs.tests_total == 4 and obs.tests_passed == 1
    failing = [r for r in obs.test_results if not r.passed]
    assert failing[0].test_name == "sum_of_evens([1, 2, 3, 4])"
    assert failing[0].error_message == "expected 6, got 4"
    assert "Ran 4 visible tests: 1 passed, 3 failed." in obs.last_execution_output
    assert obs.reward == -STEP_COST  # untouched code: no shaping


def test_run_tests_shows_printed_output_and_failing_line(env):
    env.step(
        act(
            "REPLACE_LINES",
            start_line=6,
            end_line=6,
            new_code_block="print('n is', n)\ntotal += n // 0",
        )
    )
    obs = env.step(act("RUN_TESTS"))
    assert "n is 1" in obs.last_execution_output
    assert "raised ZeroDivisionError: integer division or modulo by zero (line 7)" in (
        obs.test_results[0].error_message
    )
    assert ">>    7 |" in obs.localized_context


def test_replace_lines_reindents_flush_left_block(env):
    obs = env.step(
        act(
            "REPLACE_LINES",
            start_line=5,
            end_line=6,
            new_code_block="if n % 2 == 0:\n    total += n",
        )
    )
    assert code_of(obs)[4:6] == ["        if n % 2 == 0:", "            total += n"]
    assert ">>    5 |         if n % 2 == 0:" in obs.localized_context


def test_replace_lines_keeps_indented_block_verbatim(env):
    obs = env.step(
        act("REPLACE_LINES", start_line=5, end_line=5, new_code_block="        if n % 2 == 0:")
    )
    assert code_of(obs)[4] == "        if n % 2 == 0:"


def test_replace_lines_grows_deletes_and_inserts(env):
    start = len(env.step(act("VIEW_CODE")).code_dict)
    obs = env.step(
        act("REPLACE_LINES", start_line=3, end_line=3, new_code_block="total = 0\nseen = 0")
    )
    assert len(obs.code_dict) == start + 1
    obs = env.step(act("REPLACE_LINES", start_line=4, end_line=4, new_code_block=""))
    assert len(obs.code_dict) == start and obs.last_action_error is None
    obs = env.step(act("REPLACE_LINES", start_line=1, end_line=0, new_code_block="import math"))
    assert code_of(obs)[0] == "import math" and len(obs.code_dict) == start + 1
    obs = env.step(
        act("REPLACE_LINES", start_line=start + 2, end_line=start + 1, new_code_block="# end")
    )
    assert code_of(obs)[-1] == "    # end"


def test_replace_lines_invalid_forms(env):
    before = code_of(env.step(act("VIEW_CODE")))
    count = len(before)
    for fields, message in (
        ({"end_line": 2, "new_code_block": "x"}, "REPLACE_LINES needs start_line ("),
        ({"start_line": 2, "end_line": 2}, "needs new_code_block"),
        ({"start_line": 0, "end_line": 1, "new_code_block": "x"}, "start_line 0 is outside"),
        ({"start_line": 3, "end_line": 1, "new_code_block": "x"}, "end_line 1 must be"),
        ({"start_line": 1, "end_line": count + 1, "new_code_block": "x"}, "must be between"),
        ({"start_line": 1, "end_line": 1, "new_code_block": "x\n" * 500}, "larger than"),
    ):
        obs = env.step(act("REPLACE_LINES", **fields))
        assert message in obs.last_action_error, fields
        assert code_of(obs) == before
        assert obs.reward == -(STEP_COST + INVALID_ACTION_PENALTY)


def test_syntax_error_is_flagged_and_graded_as_failure(env):
    obs = env.step(act("REPLACE_LINES", start_line=5, end_line=5, new_code_block="if n % 2 == 0"))
    assert obs.syntax_error and obs.last_action_error is None
    assert ">>    5 |" in obs.localized_context
    obs = env.step(act("RUN_TESTS"))
    assert obs.tests_passed == 0
    assert obs.test_results[0].error_message.startswith("SyntaxError: expected ':' (line 5)")


def test_undo_history_is_bounded_in_size(env):
    import sys

    big = "\n".join(f"x{i} = {'9' * 90}" for i in range(180))  # ~18,000 characters
    versions = []
    for n in range(25):
        obs = env.step(act("REPLACE_LINES", start_line=1, end_line=len(env.episode.editor.lines),
                           new_code_block=f"# version {n}\n" + big))  # fmt: skip
        assert obs.last_action_error is None
        versions.append(code_of(obs))
    assert sum(map(sys.getsizeof, env.episode.editor.history)) <= UNDO_MAX_BYTES
    assert len(env.episode.editor.history) <= UNDO_DEPTH
    kept = len(env.episode.editor.history)
    assert 1 <= kept < 25
    for expected in reversed(versions[-kept - 1 : -1]):
        assert code_of(env.step(act("UNDO_EDIT"))) == expected
    assert env.step(act("UNDO_EDIT")).last_action_error == "nothing to undo"
    env.step(
        act(
            "REPLACE_LINES", start_line=1, end_line=len(env.episode.editor.lines), new_code_block=""
        )
    )
    assert env.episode.editor.lines == []
    env.step(act("REPLACE_LINES", start_line=1, end_line=0, new_code_block="x = 1"))
    assert code_of(env.step(act("UNDO_EDIT"))) == [] and env.episode.editor.lines == []


def test_undo_and_reset_to_original(env, registry):
    original = registry.tasks[TASK].buggy_code.rstrip("\n").split("\n")
    obs = env.step(act("UNDO_EDIT"))
    assert obs.last_action_error == "nothing to undo"
    obs = env.step(act("RESET_TO_ORIGINAL"))
    assert "already the original" in obs.last_action_error
    env.step(act("REPLACE_LINES", start_line=1, end_line=1, new_code_block="def sum_of_evens(xs):"))
    edited = code_of(env.step(act("REPLACE_LINES", start_line=2, end_line=2, new_code_block="")))
    obs = env.step(act("RESET_TO_ORIGINAL"))
    assert code_of(obs) == original and obs.last_action_error is None
    assert code_of(env.step(act("UNDO_EDIT"))) == edited
    obs = env.step(act("UNDO_EDIT"))
    assert code_of(obs)[0] == "def sum_of_evens(xs):" and len(obs.code_dict) == len(original)
    assert code_of(env.step(act("UNDO_EDIT"))) == original


def test_submit_ends_and_later_steps_are_rejected(env):
    obs = env.step(act("SUBMIT"))
    assert obs.done and obs.score is not None and 0 < obs.score < 1
    assert obs.solved is False and obs.truncated is False
    assert "hidden" in obs.last_execution_output
    steps = env.state.step_count
    obs = env.step(act("REPLACE_LINES", start_line=1, end_line=1, new_code_block="x = 1"))
    assert obs.done and "episode is over" in obs.last_action_error
    assert obs.reward == -INVALID_ACTION_PENALTY and env.state.step_count == steps


def test_max_steps_truncates_and_grades(make_env):
    env = make_env()
    env.reset(task_id=TASK, max_steps=3)
    assert not env.step(act("VIEW_CODE")).done
    env.step(act("VIEW_CODE"))
    obs = env.step(act("VIEW_CODE"))
    assert obs.done and obs.truncated is True and obs.solved is False
    assert obs.steps_remaining == 0 and env.state.done and env.state.step_count == 3
    assert "Reached max_steps" in obs.last_execution_output


def test_max_steps_default_is_the_constructor_argument(registry: TaskRegistry):
    env = TraceFixEnvironment(registry=registry, max_steps=7)
    assert env.reset(task_id=TASK).steps_remaining == 7 and env.state.max_steps == 7
    assert env.reset(task_id=TASK, max_steps=3).steps_remaining == 3


def test_timing_out_and_crashing_submissions_fail_cleanly(make_env):
    for block in ("while True:\n    pass", "import ctypes\nctypes.string_at(0)"):
        env = make_env()
        env.reset(task_id=TASK)
        env.step(act("REPLACE_LINES", start_line=3, end_line=3, new_code_block=block))
        obs = env.step(act("RUN_TESTS"))
        assert obs.tests_passed == 0 and obs.last_action_error is None
        assert all(
            r.error_message.startswith(("no result", "timed out")) for r in obs.test_results
        ), obs.test_results
        obs = env.step(act("SUBMIT"))
        assert obs.done and obs.score == 0.0 and obs.solved is False


def test_reindent_rule():
    assert reindent("a\n  b", "    ") == ["    a", "      b"]
    assert reindent("  a\n    b", "    ") == ["  a", "    b"]
    assert reindent("a\n\nb\n", "  ") == ["  a", "", "  b"]


def test_state_fields(env):
    env.step(act("VIEW_CODE"))
    state = env.state
    assert (state.episode_id, state.step_count, state.task_id) == ("ep-test", 1, TASK)
    assert (state.difficulty, state.max_steps, state.done) == ("easy", 50, False)


# -- reward properties -------------------------------------------------------------------


def full_fix(obs, solution: str) -> TraceFixAction:
    return act(
        "REPLACE_LINES",
        start_line=1,
        end_line=len(obs.code_dict),
        new_code_block=solution.rstrip("\n"),
    )


def play(env: TraceFixEnvironment, task, policy) -> tuple[float, object]:
    obs = env.reset(task_id=task.task_id)
    rewards = []
    for action in policy(obs, task):
        if obs.done:
            break
        obs = env.step(action(obs) if callable(action) else action)
        rewards.append(obs.reward)
        assert REWARD_RANGE[0] <= obs.reward <= REWARD_RANGE[1]
    return sum(rewards), obs


def oracle(obs, task):
    return [lambda o: full_fix(o, task.solution), act("SUBMIT")]


def explore_then_fix(obs, task):
    return [
        act("VIEW_CODE"),
        act("RUN_TESTS"),
        lambda o: full_fix(o, task.solution),
        act("RUN_TESTS"),
        act("RUN_TESTS"),
        act("SUBMIT"),
    ]


def fix_undo_churn(obs, task):
    churn = [
        lambda o: full_fix(o, task.solution),
        act("RUN_TESTS"),
        act("UNDO_EDIT"),
        act("RUN_TESTS"),
    ] * 3
    return churn + [lambda o: full_fix(o, task.solution), act("RUN_TESTS"), act("SUBMIT")]


def break_then_fix(obs, task):
    return [
        act(
            "REPLACE_LINES",
            start_line=1,
            end_line=len(obs.code_dict),
            new_code_block="raise ValueError('broken')",
        ),
        act("RUN_TESTS"),
        lambda o: full_fix(o, task.solution),
        act("RUN_TESTS"),
        act("SUBMIT"),
    ]


def never_edit(obs, task):
    return [
        act("VIEW_CODE"),
        act("RUN_TESTS"),
        act("RUN_TESTS"),
        act("VIEW_CODE", start_line=1),
        act("SUBMIT"),
    ]


def farm(obs, task):
    return [act("RUN_TESTS") if i % 2 == 0 else act("VIEW_CODE") for i in range(60)]


def submit_untouched(obs, task):
    return [act("SUBMIT")]


def invalid_spam(obs, task):
    return [act("UNDO_EDIT"), act("VIEW_CODE", start_line=999)] * 10 + [act("SUBMIT")]


def test_reward_properties_on_curated_and_sampled_generated_tasks(make_env, registry: TaskRegistry):
    env = make_env()
    others = (
        explore_then_fix,
        fix_undo_churn,
        break_then_fix,
        never_edit,
        farm,
        submit_untouched,
        invalid_spam,
    )
    curated = [registry.tasks[i] for i in registry.ids(source="curated")]
    generated = registry.ids(source="generated")[::100]  # a fixed sample of 12
    for task in curated + [registry.tasks[i] for i in generated]:
        best, final = play(env, task, oracle)
        assert final.solved and final.score == 1.0 and not final.truncated, task.task_id
        returns = {policy.__name__: play(env, task, policy) for policy in others}
        for name, (total, _) in returns.items():
            assert total < best, (task.task_id, name, total, best)
        assert returns["explore_then_fix"][1].solved
        for name in ("never_edit", "farm", "submit_untouched", "invalid_spam"):
            assert returns[name][0] <= 0, (task.task_id, name)
        assert returns["farm"][1].truncated is True


def test_repeated_runs_earn_nothing(env):
    env.step(act("REPLACE_LINES", start_line=5, end_line=5, new_code_block="if n % 2 == 0:"))
    first = env.step(act("RUN_TESTS")).reward
    assert first > 0
    assert [env.step(act("RUN_TESTS")).reward for _ in range(3)] == [-STEP_COST] * 3


def test_busy_sandbox_is_reported_without_penalty(registry: TaskRegistry):
    import threading

    from tracefix_rl.sandbox import EvalRequest, Limits, ZygotePool

    box = ZygotePool(limits=Limits(wall_s=2.0), workers=1, queue_timeout_s=0.1)
    env = TraceFixEnvironment(registry=registry, sandbox=box)
    env.reset(task_id=TASK)
    hog = threading.Thread(target=box.run, args=(EvalRequest("import time", ("time.sleep(5)",)),))
    hog.start()
    while box.describe()["in_flight"] == 0:
        pass
    obs = env.step(act("RUN_TESTS"))
    assert "sandbox busy" in obs.last_action_error and obs.reward == 0.0
    assert "not counted" in obs.last_action_error and obs.step_count == 0
    obs = env.step(act("SUBMIT"))
    assert "sandbox busy" in obs.last_action_error and not obs.done and obs.step_count == 0
    hog.join()
    obs = env.step(act("SUBMIT"))
    assert obs.done and obs.last_action_error is None
    box.close()


def test_one_evaluation_in_flight_per_episode(env):
    env._grader._evaluating.acquire()
    try:
        obs = env.step(act("RUN_TESTS"))
        assert obs.last_action_error == "an evaluation is already running for this episode"
    finally:
        env._grader._evaluating.release()
    assert env.step(act("RUN_TESTS")).last_action_error is None


def test_busy_sandbox_at_max_steps_keeps_the_episode_open(registry: TaskRegistry):
    """The final grading at max_steps meets a busy sandbox as SUBMIT does: reported in the
    observation (never raised), and retried by the next step."""
    import threading

    from tracefix_rl.sandbox import EvalRequest, Limits, ZygotePool

    box = ZygotePool(limits=Limits(wall_s=3.0), workers=1, queue_timeout_s=0.1)
    env = TraceFixEnvironment(registry=registry, sandbox=box)
    env.reset(task_id=TASK, max_steps=1)
    hog = threading.Thread(target=box.run, args=(EvalRequest("import time", ("time.sleep(5)",)),))
    hog.start()
    while box.describe()["in_flight"] == 0:
        pass
    try:
        obs = env.step(act("VIEW_CODE"))
        assert not obs.done and obs.step_count == 1 and obs.reward == -STEP_COST
        assert "max_steps reached, but the final grading failed" in obs.last_action_error
        assert "sandbox busy" in obs.last_action_error
        obs = env.step(act("REPLACE_LINES", start_line=1, end_line=1, new_code_block="x = 1"))
        assert not obs.done and obs.reward == 0.0 and obs.step_count == 1
        assert "retry the grading" in obs.last_action_error
    finally:
        hog.join()
    obs = env.step(act("REPLACE_LINES", start_line=1, end_line=1, new_code_block="x = 1"))
    assert obs.done and obs.truncated is True and obs.last_action_error is None
    assert code_of(obs)[0] == "def sum_of_evens(nums):"  # the retry applied no action
    box.close()


# -- the normalised gain -----------------------------------------------------------------


def test_normalised_gain_rules():
    from tracefix_rl.episode.state import normalised_gain

    before = [True, False, False, False, True]  # 3 originally failing, 2 passing
    assert normalised_gain(before, before, solved=False) == 0.0  # no better
    assert normalised_gain(before, [True, True, False, False, True], solved=False) == 1 / 3
    assert normalised_gain(before, [False, True, True, False, True], solved=False) == 1 / 3
    assert normalised_gain(before, [False, True, False, False, False], solved=False) == 0.0
    assert normalised_gain(before, [False] * 5, solved=False) == 0.0  # clamped, not negative
    assert normalised_gain(before, [True] * 5, solved=True) == 1.0


def test_gain_is_set_when_done_and_measures_the_change(make_env, registry: TaskRegistry):
    task = registry.tasks[TASK]
    assert len(task.buggy_passing) == len(task.all_tests)
    assert sum(task.buggy_passing) == task.buggy_all_passed > 0  # a do-nothing score
    env = make_env()
    assert env.reset(task_id=TASK).gain is None
    assert env.step(act("RUN_TESTS")).gain is None
    untouched = env.step(act("SUBMIT"))  # the buggy code, as it was
    assert untouched.gain == 0.0 and untouched.score == sum(task.buggy_passing) / len(
        task.all_tests
    )
    env.reset(task_id=TASK)
    lines = len(task.buggy_code.splitlines())
    env.step(act("REPLACE_LINES", start_line=1, end_line=lines, new_code_block=task.solution))
    solved = env.step(act("SUBMIT"))
    assert solved.solved and solved.gain == 1.0 and solved.score == 1.0
    env.reset(task_id=TASK, max_steps=2)
    env.step(act("REPLACE_LINES", start_line=1, end_line=lines, new_code_block="x = 1"))
    broken = env.step(act("VIEW_CODE"))  # truncated: graded like SUBMIT; every test fails
    assert broken.done and broken.truncated and broken.gain == 0.0 and broken.score == 0.0


def test_gain_of_a_generated_task_uses_the_corpus_outcomes(make_env, registry):
    from dataclasses import replace

    task_id = registry.ids(source="generated")[0]
    task = registry.tasks[task_id]
    assert len(task.buggy_passing) == len(task.all_tests)  # the corpus stores them per test
    assert sum(task.buggy_passing) == task.buggy_all_passed
    env = make_env()
    env.reset(task_id=task_id)
    obs = env.step(act("SUBMIT"))
    assert obs.done and obs.gain == 0.0 and obs.score == task.buggy_all_passed / len(task.all_tests)
    assert env.episode.buggy_outcomes() == task.buggy_passing
    older = replace(task, buggy_passing=())  # a corpus written before they were stored
    measured = TraceFixEnvironment(registry=TaskRegistry(tasks={task_id: older}))
    measured.reset(task_id=task_id)
    assert measured.step(act("SUBMIT")).gain == 0.0
    assert measured.episode.buggy_outcomes() == task.buggy_passing  # measured: the same
    measured.close()
