"""TRL against a live server, offline: ``TraceFixToolEnv`` drives a real ``GRPOTrainer``.

Run with the ``train`` dependency group: ``uv run --group train pytest -m train``. Nothing is
downloaded: the model is a tiny randomly initialised Qwen2 and its tokenizer is a byte-level
BPE trained here on the task files, with TRL's own Qwen2.5 chat template (so TRL recognises
it and parses its tool calls).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
import tomllib
from typing import Any

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.train

TASK = "sum_of_evens_wrong_modulus"
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOOL_TAGS = ["<tool_call>", "</tool_call>"]  # plain added tokens: decoded, so parsed
TEACH_STEPS = 150
TAUGHT_CALL = '<tool_call>\n{"name": "run_tests", "arguments": {}}\n</tool_call><|im_end|>'


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A byte-level BPE tokenizer trained on the curated tasks and the tool schemas."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from trl.chat_template_utils import qwen2_5_chat_template

    corpus = []
    for path in sorted((REPO / "task_data" / "curated").glob("*.toml")):
        task = tomllib.loads(path.read_text())
        corpus += [task["description"], task["buggy_code"], task["solution"]]
    corpus += [json.dumps(schema) for schema in _tool_schemas()]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus * 4, trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ))  # fmt: skip
    built = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    built.add_tokens(TOOL_TAGS)
    built.chat_template = qwen2_5_chat_template
    return built


def _tool_schemas() -> list[dict[str, Any]]:
    from transformers.utils import get_json_schema

    from tracefix_rl import TraceFixToolEnv

    return [get_json_schema(tool) for tool in _tools(TraceFixToolEnv()).values()]


def _tools(env: Any) -> dict[str, Any]:
    """The tools TRL finds on an environment: its public methods but reset and get_reward."""
    return {
        name: getattr(env, name)
        for name, _ in inspect.getmembers(type(env), predicate=inspect.isfunction)
        if name not in ("reset", "get_reward") and not name.startswith("_")
    }


def tiny_model(tokenizer: Any) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=16384, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def teach_tool_call(model: Any, tokenizer: Any, prompts: list[str], reply: str) -> float:
    """Fit the model (a few hundred milliseconds) to answer every prompt with ``reply``, so
    its rollouts make a real tool call for TRL to parse and run; returns the final loss."""
    import torch

    target = tokenizer(reply, add_special_tokens=False)["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(TEACH_STEPS):
        prompt = tokenizer(prompts[step % len(prompts)], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return float(loss.detach())


def test_scripted_tool_calls_through_trls_parser_solve_a_task(server, tokenizer):
    """What the model would write, parsed by TRL's own parser and dispatched as TRL does:
    the TRL tool schema lists every action, and the calls solve the task."""
    from trl.chat_template_utils import add_response_schema, parse_response

    from tracefix_rl import TraceFixToolEnv
    from tracefix_rl.actions import ACTIONS

    Env = TraceFixToolEnv.configured(base_url=server.url)
    env = Env()
    tools = _tools(env)
    assert sorted(tools) == sorted(action.name.lower() for action in ACTIONS)
    task = env.reset(task_id=TASK, prompt=[{"role": "user", "content": "Fix it."}], extra=1)
    assert "def sum_of_evens(nums):" in task and "   5 |         if n % 2 == 1:" in task

    parser = add_response_schema(tokenizer)
    prompt = [{"role": "user", "content": "Fix it." + task}]
    rendered = tokenizer.apply_chat_template(
        prompt, tools=list(tools.values()), tokenize=False, add_generation_prompt=True
    )
    assert all(f'"name": "{name}"' in rendered for name in tools), rendered[:2000]
    prefix = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    script = [
        ("run_tests", {}),
        ("replace_lines", {"start_line": 99, "end_line": 99, "new_code_block": "x"}),
        ("replace_lines", {"start_line": 5, "end_line": 5, "new_code_block": "if n % 2 == 0:"}),
        ("run_tests", {}),
        ("submit", {}),
        ("run_tests", {}),
    ]
    replies = []
    for name, arguments in script:
        text = f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"
        ids = tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
        message = parse_response(parser, ids, prefix=prefix, tools=list(tools.values()))
        [call] = message["tool_calls"]
        assert call["function"] == {"name": name, "arguments": arguments}
        try:  # as TRL's tool loop calls a tool
            replies.append(str(tools[name](**call["function"]["arguments"])))
        except Exception as exc:  # noqa: BLE001 - TRL turns it into an error message
            replies.append(str({"error": str(exc)}))
    assert "1 passed, 3 failed" in replies[0]
    assert replies[1].startswith("{'error': 'start_line 99 is outside")
    assert "4 passed, 0 failed" in replies[3]
    assert "score 1.000, solved: true" in replies[4]
    assert replies[5] == "{'error': 'the episode is over: no more actions'}"
    assert env.get_reward() > 1.0  # the return: solved, minus the step costs and the penalty
    assert Env.configured(base_url=server.url, reward="solved")().get_reward() == 0.0


def test_grpo_trains_a_tiny_model_against_the_live_server(server, tokenizer, tmp_path, capsys):
    """Two GRPO optimiser steps with TraceFixToolEnv as the environment factory. TRL probes
    it, resets pooled instances with the dataset's rows, parses the model's tool calls (the
    model was taught to call run_tests first) and runs them on the server, and scores every
    rollout with get_reward (the model never submits: each episode is auto-submitted)."""
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from tracefix_rl import TraceFixToolEnv, task_dataset

    torch.manual_seed(0)
    Env = TraceFixToolEnv.configured(base_url=server.url, reward="return")
    dataset = task_dataset(server.url, split="train", difficulty="easy", source="curated")
    assert {"prompt", "task_id", "difficulty", "split"} <= set(dataset.column_names)
    dataset = dataset.select(range(2))
    model = tiny_model(tokenizer)
    probe = Env()
    tools = list(_tools(probe).values())
    prompts = []
    for row in dataset:
        task = probe.reset(**row)
        messages = [{"role": "user", "content": row["prompt"][0]["content"] + task}]
        prompts.append(tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        ))  # fmt: skip
    assert teach_tool_call(model, tokenizer, prompts, TAUGHT_CALL) < 0.01
    args = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, seed=0,
        per_device_train_batch_size=2, num_generations=2, gradient_accumulation_steps=1,
        max_completion_length=64, max_tool_calling_iterations=1, max_steps=2,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=args,
                          train_dataset=dataset, environment_factory=Env)  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    per_step = (time.perf_counter() - started) / trainer.state.global_step
    assert trainer.state.global_step == 2
    history = trainer.state.log_history
    rewards = [entry["rewards/TraceFixToolEnv/mean"] for entry in history
               if "rewards/TraceFixToolEnv/mean" in entry]  # fmt: skip
    assert len(rewards) == 2 and all(-1.0 <= reward <= 2.0 for reward in rewards), history
    assert any(entry.get("tools/call_frequency", 0) > 0 for entry in history), history
    steps = {int(state["step"]) for state in trainer.optimizer.state.values()}
    assert steps == {2}, steps  # the optimiser stepped every parameter twice
    pooled = trainer._environment_pool[None]
    assert pooled and all(type(env) is Env for env in pooled)
    assert all(env._observation is not None and env._observation.done for env in pooled)
    ran_tests = [env for env in pooled if env._observation.step_count >= 2]
    assert ran_tests, "no rollout's tool call reached the server"
    with capsys.disabled():
        print(f"\n[train] GRPO: {per_step:.2f} s per optimiser step (tiny model, 2 rollouts)")


def test_the_example_training_script_runs(server, tokenizer, tmp_path):
    """examples/train_grpo.py, as documented, on a tiny local model: one step, then saved."""
    model_dir, out = tmp_path / "model", tmp_path / "run"
    tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    command = [
        sys.executable, str(REPO / "examples" / "train_grpo.py"), "--model", str(model_dir),
        "--env-url", server.url, "--difficulty", "easy", "--source", "curated", "--cpu",
        "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--num-generations", "2",
        "--max-completion-length", "32", "--max-tool-calls", "1", "--output-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "training rows from" in run.stderr and "MAX_CONCURRENT_ENVS >= 2" in run.stderr
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
