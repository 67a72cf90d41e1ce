"""The baseline agent behind ``inference.py``, one module per concern (see ``inference.py``'s
docstring for what it does and prints)."""

from tracefix_rl import models  # noqa: F401  (first: keeps gradio out of this process)
