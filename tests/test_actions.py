"""The action registry and everything derived from it: the wire model, the dispatch, the
baseline agent's prompt and tool, the README table."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.conftest import run_in_package_copy
from tracefix_rl import inference
from tracefix_rl.actions import ACTIONS, action_table, get_action, wire_fields
from tracefix_rl.models import ACTION_TYPES, TraceFixAction

REPO = Path(__file__).resolve().parent.parent
TASK = "sum_of_evens_wrong_modulus"
NO_CACHES = shutil.ignore_patterns("__pycache__")


def test_the_registry_holds_one_action_per_module_in_order():
    modules = sorted(
        path.stem for path in (REPO / "actions").glob("*.py") if not path.stem.startswith("_")
    )
    assert sorted(action.__module__.rsplit(".", 1)[1] for action in ACTIONS) == sorted(
        m for m in modules if m != "base"
    )
    assert [a.order for a in ACTIONS] == sorted(a.order for a in ACTIONS)
    assert ACTION_TYPES == (
        "VIEW_CODE", "RUN_TESTS", "TRACE", "REPLACE_LINES", "UNDO_EDIT", "RESET_TO_ORIGINAL",
        "SUBMIT",
    )  # fmt: skip
    for action in ACTIONS:
        assert re.fullmatch(r"[A-Z][A-Z_]*", action.name) and action.description.strip()
        assert get_action(action.name) is action


def test_the_wire_model_is_derived_from_the_registry():
    schema = TraceFixAction.model_json_schema()
    assert schema["properties"]["action_type"]["enum"] == list(ACTION_TYPES)
    params = {field.name for field in wire_fields()}
    assert params == {"start_line", "end_line", "new_code_block", "test", "lines", "watch"}
    assert set(TraceFixAction.model_fields) == {"metadata", "action_type", "thought"} | params
    assert schema["additionalProperties"] is False
    for action in ACTIONS:
        assert action.description in schema["description"]
        for example in action.examples:  # every example is a valid wire action
            TraceFixAction(action_type=action.name, **example)
    with pytest.raises(ValidationError):
        TraceFixAction(action_type="FIND")
    with pytest.raises(ValidationError):  # line numbers stay strict JSON integers
        TraceFixAction(action_type="VIEW_CODE", start_line=True)
    assert TraceFixAction(action_type="VIEW_CODE", start_line=5.0).start_line == 5


def test_each_action_checks_its_own_parameters(make_env):
    env = make_env()
    env.reset(task_id=TASK)
    obs = env.step(TraceFixAction(action_type="REPLACE_LINES", start_line=1, end_line=1))
    assert obs.last_action_error.startswith("REPLACE_LINES needs new_code_block (")
    obs = env.step(TraceFixAction(action_type="REPLACE_LINES", new_code_block="x"))
    assert obs.last_action_error.startswith("REPLACE_LINES needs start_line and end_line (")
    obs = env.step(TraceFixAction(action_type="RUN_TESTS", new_code_block="ignored"))
    assert obs.last_action_error is None and obs.tests_total == 4
    schema = get_action("REPLACE_LINES").tool_schema()
    assert schema["required"] == ["start_line", "end_line", "new_code_block"]
    assert get_action("SUBMIT").tool_schema()["properties"] == {}


def test_the_baseline_agent_derives_its_prompt_and_tool():
    tool = inference.action_tool()["function"]["parameters"]
    wire = TraceFixAction.model_json_schema()["properties"]
    assert set(tool["properties"]) == set(wire) - {"metadata"}
    assert tool["properties"]["action_type"]["enum"] == list(ACTION_TYPES)
    assert tool["properties"]["start_line"] == {
        "type": "integer", "description": wire["start_line"]["description"],
    }  # fmt: skip
    assert tool["properties"]["test"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert tool["properties"]["lines"]["items"] == {"type": "integer"}  # list parameters
    assert tool["required"] == ["action_type"]
    prompt = inference.system_prompt()
    for action in ACTIONS:
        assert f"- {action.name}: {action.description}" in prompt
        assert f'{{"action_type": "{action.name}"' in prompt
    for prose in ("I will RUN_TESTS now", "REPLACE_LINES please"):
        with pytest.raises(inference.ParseError):  # an action word in prose is no action
            inference.parse_action(prose)


def test_the_readme_action_table_is_the_registry():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- actions:begin -->\n(.*?)\n<!-- actions:end -->", readme, re.S)
    assert block is not None, "README.md lost its action table markers"
    assert block.group(1) == action_table(), (
        "README.md's action table is stale: paste the output of"
        " uv run python -m tracefix_rl.actions"
    )


EXAMPLE_PROBE = """
import sys
from pathlib import Path

import tracefix_rl
from tracefix_rl import inference
from tracefix_rl.actions import action_table
from tracefix_rl.environment import TraceFixEnvironment
from tracefix_rl.models import ACTION_TYPES, TraceFixAction
from tracefix_rl.sandbox import close_sandbox
from tracefix_rl.tasks.registry import load_registry

package = Path(tracefix_rl.__file__).parent
assert package == Path(sys.argv[1]), tracefix_rl.__file__  # the copy, not the checkout
assert ACTION_TYPES[:3] == ("VIEW_CODE", "FIND", "RUN_TESTS"), ACTION_TYPES
tool = inference.action_tool()["function"]["parameters"]["properties"]
assert "FIND" in tool["action_type"]["enum"] and tool["text"]["type"] == "string", tool
assert "- FIND: List the lines" in inference.system_prompt()
assert "| `FIND` | `text` |" in action_table()
env = TraceFixEnvironment(
    registry=load_registry(builtin_dir=package / "task_data" / "curated", corpus=None)
)
try:
    env.reset(task_id=sys.argv[2])
    found = env.step(TraceFixAction(action_type="FIND", text="return"))
    assert found.last_action_error is None, found.last_action_error
    assert found.step_count == 1 and "| " in found.last_execution_output
    assert all("return" in line for line in found.last_execution_output.splitlines())
    empty = env.step(TraceFixAction(action_type="FIND", text=""))
    assert empty.last_action_error == "text is empty" and empty.reward < found.reward
    submitted = env.step(TraceFixAction(action_type="SUBMIT"))
    assert submitted.done and submitted.step_count == 3
finally:
    env.close()
    close_sandbox()
print("FIND works")
"""


def test_the_documented_example_adds_an_action_with_one_module(tmp_path):
    """The FIND example of docs/development.md ("Adding an action"), written into a copy of the
    package, is a working action: on the wire, in the agent's tool and prompt, in the table and
    in the environment."""
    page = (REPO / "docs" / "development.md").read_text()
    example = re.search(
        r"<!-- example-action:begin -->\n```python\n(.*?)```\n<!-- example-action:end -->",
        page,
        re.S,
    )
    assert example, "docs/development.md's example action is missing"
    probe = run_in_package_copy(tmp_path, {"actions/find.py": example.group(1)}, TASK,
                                EXAMPLE_PROBE)  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "FIND works"
