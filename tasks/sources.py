"""Where tasks come from: built-in task files and ``TRACEFIX_TASKS`` packs (TOML, JSON, JSONL)."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent.parent / "task_data"
BUILTIN_DIR = DATA_DIR / "curated"
GENERATED_CORPUS = DATA_DIR / "generated" / "corpus.jsonl"
TASKS_ENV = "TRACEFIX_TASKS"
TASK_FILE_SUFFIXES = (".toml", ".json", ".jsonl")


def task_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in TASK_FILE_SUFFIXES)
    return [path]


def json_lines(text: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) for every non-blank line of JSON Lines ``text``; the value is the
    ``json.JSONDecodeError`` of a line that is not JSON."""
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, exc


def read_entries(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (origin, raw entry or exception) for every task entry in ``path``."""
    if not path.exists():
        yield str(path), FileNotFoundError("no such file or directory")
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        yield str(path), exc
        return
    if path.suffix == ".toml":
        try:
            yield str(path), tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            yield str(path), ValueError(f"invalid TOML: {exc}")
    elif path.suffix == ".jsonl":
        for number, value in json_lines(text):
            if isinstance(value, json.JSONDecodeError):
                value = ValueError(f"invalid JSON: {value.msg} (column {value.colno})")
            yield f"{path}:{number}", value
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            yield str(path), ValueError(f"invalid JSON: {exc.msg} (line {exc.lineno})")
            return
        items = data if isinstance(data, list) else [data]
        for number, item in enumerate(items):
            yield (f"{path}[{number}]" if isinstance(data, list) else str(path)), item
    else:
        yield (
            str(path),
            ValueError(
                f"unsupported file type {path.suffix!r}; use one of {', '.join(TASK_FILE_SUFFIXES)}"
            ),
        )
