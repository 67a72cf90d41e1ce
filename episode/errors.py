"""The error every action reports through the observation instead of raising."""


class ActionError(Exception):
    """An action the environment rejects; its message becomes ``last_action_error``.

    The step still counts and costs ``INVALID_ACTION_PENALTY`` on top of ``STEP_COST``."""
