"""The words tasks are described in: difficulty tiers and splits.

Imports nothing, so the wire models (``models.py``) publish these choices without importing
the task machinery, and the task machinery does not import the wire models.
"""

from typing import Literal

Difficulty = Literal["easy", "medium", "hard"]
DIFFICULTIES: tuple[str, ...] = Difficulty.__args__  # type: ignore[attr-defined]
Split = Literal["train", "eval"]
SPLITS: tuple[str, ...] = Split.__args__  # type: ignore[attr-defined]
