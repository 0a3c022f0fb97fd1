"""Recovery of a pruned network: mimic losses, one-step recovery and the layer-by-layer baseline.

Add a mimic loss by writing a :class:`MimicLoss` subclass and ``@MIMIC_LOSSES.register("name")``.
"""

from deploy_prune.recovery.losses import MIMIC_LOSSES, MimicLoss

__all__ = ["MIMIC_LOSSES", "MimicLoss"]
