"""The reward: a cost per step, potential-based shaping, and a final settlement.

Every constant below is used; the README's reward section states the same rules:

* every step costs ``STEP_COST``; a rejected action costs ``INVALID_ACTION_PENALTY`` more;
* RUN_TESTS pays potential-based shaping ``VISIBLE_WEIGHT * (phi - phi_prev)``, where phi
  is the visible pass fraction and phi_prev the fraction of the last *measured* code
  (initially the buggy code's), so re-running unchanged code earns nothing and edit/undo
  cycles telescope to zero;
* the episode's last step (SUBMIT, or reaching ``max_steps``) settles the shaping against
  the final code and adds ``SCORE_WEIGHT * (score - score_buggy) + SOLVE_BONUS * solved``,
  where ``score`` is the pass fraction over visible and hidden tests.

So an episode's return is ``VISIBLE_WEIGHT*(phi_final - phi_buggy) + SCORE_WEIGHT*(score -
score_buggy) + SOLVE_BONUS*solved - costs``: leaving the code as it was returns at most 0,
and the shortest correct fix has the highest return.
"""

from __future__ import annotations

STEP_COST = 0.01
INVALID_ACTION_PENALTY = 0.02
VISIBLE_WEIGHT = 0.2
SCORE_WEIGHT = 0.3
SOLVE_BONUS = 1.0
REWARD_RANGE = (-1.0, 2.0)  # declared in openenv.yaml; every step reward lies inside it
REWARD_DIGITS = 6  # rewards are rounded to this many decimals on the wire


class Shaping:
    """The potential of one episode: the visible pass fraction of the last measured code,
    and the buggy program's scores the final reward is measured from."""

    def __init__(self, phi_buggy: float, score_buggy: float) -> None:
        self.phi = phi_buggy
        self.score_buggy = score_buggy

    def measured(self, phi: float) -> float:
        """The shaping reward of a run whose visible pass fraction is ``phi``."""
        reward = VISIBLE_WEIGHT * (phi - self.phi)
        self.phi = phi
        return reward

    def final(self, phi: float, score: float, solved: bool) -> float:
        """The last step's reward: the shaping settled against the final code's ``phi``, the
        score gained over the buggy program, and the bonus if every test passes."""
        return (
            self.measured(phi)
            + SCORE_WEIGHT * (score - self.score_buggy)
            + (SOLVE_BONUS if solved else 0.0)
        )
