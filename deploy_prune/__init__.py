"""deploy-prune core: learned-importance channel pruning, surgery and one-step recovery."""

__version__ = "0.1.0"
