"""Channel scorers: one score per channel of every node (higher = more important).

Add a scorer by writing a module with a :class:`Scorer` subclass and registering it:
``@SCORERS.register("name")``.
"""

# Importing the modules registers them.
from deploy_prune.scoring import baselines, beta, rbp  # noqa: E402,F401,I001
from deploy_prune.scoring._base import SCORERS, Decision, Goal, ScoreContext, Scorer, Scores, node_scores

__all__ = ["SCORERS", "Decision", "Goal", "ScoreContext", "Scorer", "Scores", "node_scores"]
