"""Fold each BatchNorm into the convolution or linear layer that feeds it.

Done in PyTorch before export, so that every exporter and every torch version ships the same
folded graph (``conv(x) * s + t`` becomes one conv with scaled weights and a bias) instead of
relying on each exporter's own optimiser to do it.
"""

from __future__ import annotations

import copy
import logging

from torch import nn

log = logging.getLogger(__name__)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every conv->BN and linear->BN pair folded.

    Uses torch.fx's ``fuse`` (symbolic trace, then ``fuse_conv_bn_eval`` /
    ``fuse_linear_bn_eval`` wherever a BN is the only consumer of a conv or linear). A model
    that fx cannot trace is returned unfolded, with a warning; ``model`` itself is untouched.
    """
    from torch.fx.experimental.optimization import fuse

    work = copy.deepcopy(model).eval()
    try:
        folded = fuse(work, inplace=True)
    except Exception as e:  # fx tracing fails on data-dependent control flow
        log.warning("cannot fx-trace %s to fold BatchNorm (%s: %s); exporting it unfolded",
                    type(model).__name__, type(e).__name__, e)
        return work
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    if left:
        log.info("%d BatchNorm layer(s) have no conv/linear to fold into; kept", left)
    return folded.eval()
