"""Train a model to debug with GRPO (TRL) on a running tracefix_rl server.

    # 1. a server with room for every rollout of a generation batch (see "Capacity" below)
    MAX_CONCURRENT_ENVS=64 uv run server --port 8000
    # 2. on a GPU machine, in a checkout: pip install -e . "trl[vllm]>=1.16,<1.17"
    uv run python examples/train_grpo.py --model Qwen/Qwen2.5-1.5B-Instruct \\
        --env-url http://127.0.0.1:8000 --use-vllm --output-dir runs/qwen-1.5b

Each rollout is one episode. TRL resets a pooled ``TraceFixToolEnv`` with the dataset row
(its ``task_id``), lets the model call the environment's tools (one per action:
``view_code``, ``run_tests``, ``trace``, ``replace_lines``, ``undo_edit``,
``reset_to_original``, ``submit``) for up to ``--max-tool-calls`` rounds within
``--max-completion-length`` tokens, and scores it with ``get_reward`` (an episode the model
did not submit is submitted then). ``--reward`` picks what it returns: the episode's dense
return (default), the final score, or 1/0 for solved.

Capacity: each rollout holds one WebSocket session, so the server's ``MAX_CONCURRENT_ENVS``
must be at least the number of environments TRL runs at once: ``per_device_train_batch_size
× gradient_accumulation_steps`` (the generation batch, ``--batch-size × --grad-accum`` here)
per training process. ``reset`` waits up to a minute for a free slot, then says so.

Progress goes to stderr (TRL's logs every ``--logging-steps``); the model is saved to
``--output-dir`` at the end. ``--help`` lists every option.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tracefix_rl import TraceFixToolEnv, task_dataset
from tracefix_rl.tool_env import REWARD_MODES

log = logging.getLogger("train_grpo")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add(
        "--model",
        default="Qwen/Qwen2.5-0.5B-Instruct",
        help="a model id on the Hugging Face Hub, or a local directory (default: %(default)s)",
    )
    add("--env-url", default="http://127.0.0.1:8000", help="the tracefix_rl server")
    add("--split", default="train", choices=("train", "eval"), help="tasks to train on")
    add("--difficulty", choices=("easy", "medium", "hard"), help="only this tier")
    add("--source", help="only tasks of this source (curated, generated, ...)")
    add("--repeat", type=int, default=1, help="times each task appears per epoch")
    add(
        "--reward",
        default="return",
        choices=tuple(REWARD_MODES),
        help="what get_reward returns (default: %(default)s)",
    )
    add("--output-dir", default="runs/tracefix-grpo")
    add("--max-steps", type=int, default=500, help="optimiser steps")
    add("--learning-rate", type=float, default=1e-6)
    add("--batch-size", type=int, default=8, help="per_device_train_batch_size")
    add("--grad-accum", type=int, default=4, help="gradient_accumulation_steps")
    add("--num-generations", type=int, default=8, help="rollouts per prompt (the GRPO group)")
    add(
        "--max-completion-length",
        type=int,
        default=4096,
        help="tokens per rollout, tool results included",
    )
    add("--max-tool-calls", type=int, default=20, help="max_tool_calling_iterations")
    add("--temperature", type=float, default=1.0)
    add("--use-vllm", action="store_true", help="generate with vLLM (colocated on the GPU)")
    add("--vllm-gpu-memory", type=float, default=0.3, help="vllm_gpu_memory_utilization")
    add("--cpu", action="store_true", help="train on the CPU (tests and tiny models)")
    add("--logging-steps", type=int, default=1)
    add("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    from trl import GRPOConfig, GRPOTrainer

    dataset = task_dataset(args.env_url, split=args.split, difficulty=args.difficulty,
                           source=args.source, repeat=args.repeat)  # fmt: skip
    log.info("%d training rows from %s (split=%s, difficulty=%s)", len(dataset), args.env_url,
             args.split, args.difficulty or "all")  # fmt: skip
    sessions = args.batch_size * args.grad_accum
    log.info("the server needs MAX_CONCURRENT_ENVS >= %d per training process", sessions)
    config = GRPOConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        max_tool_calling_iterations=args.max_tool_calls,
        temperature=args.temperature,
        use_vllm=args.use_vllm,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=args.vllm_gpu_memory,
        use_cpu=args.cpu,
        bf16=not args.cpu,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        # Qwen3-style templates think by default; an agent acting through tools should not.
        chat_template_kwargs={"enable_thinking": False},
    )
    trainer = GRPOTrainer(
        model=args.model,
        args=config,
        train_dataset=dataset,
        environment_factory=TraceFixToolEnv.configured(base_url=args.env_url, reward=args.reward),
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    log.info("saved the model to %s", args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
