"""``python -m tracefix_rl.actions``: print the README's action table."""

from tracefix_rl.actions import action_table

print(action_table())
