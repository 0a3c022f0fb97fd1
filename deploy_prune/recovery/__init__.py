"""Recovery of a pruned network: mimic losses, one-step recovery and the layer-by-layer baseline.

Add a mimic loss by writing a :class:`MimicLoss` subclass and ``@MIMIC_LOSSES.register("name")``.
"""

from deploy_prune._registry import Registry
from deploy_prune.recovery.losses import MIMIC_LOSSES, MimicLoss

# recovery.mode values: name -> what it does (the run's stage_recover dispatches on the name)
RECOVERY_MODES: Registry[str] = Registry("recovery mode")
for _name, _what in [("onestep", "one-step recovery: mimic the crucial nodes' feature maps"),
                     ("layerwise", "cut and reconstruct one layer at a time (the conventional baseline)"),
                     ("ce", "one-step recovery with cross-entropy on the labels only"),
                     ("none", "no recovery (fine-tuning only)")]:
    RECOVERY_MODES.register(_name)(_what)

__all__ = ["MIMIC_LOSSES", "RECOVERY_MODES", "MimicLoss"]
