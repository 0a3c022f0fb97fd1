"""Mimic losses between the original's and the slim model's feature maps (OSPR eq. 9-14).

Each takes two post-activation maps of one node, teacher and student, shape (B, C, H, W), and
returns a scalar. KL and JS compare, at every spatial position, the distribution over channels
(softmax over C): they need at least two mimicked nodes including the last conv node.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F

from deploy_prune._registry import Registry


class MimicLoss(abc.ABC):
    """Maps (teacher, student) feature maps of one node to a scalar loss."""

    needs_crucial_set: bool = False  # KL/JS: N >= 2 and the last conv node included

    @abc.abstractmethod
    def __call__(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor: ...


MIMIC_LOSSES: Registry[type[MimicLoss]] = Registry("mimic loss")


def _positions(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C): one channel vector per spatial position."""
    return x.flatten(2).transpose(1, 2).reshape(-1, x.shape[1])


@MIMIC_LOSSES.register("kl")
class KLMimic(MimicLoss):
    """OSPR eq. 10-14: mean over positions of KL(P || P'), P = softmax_c(relu(X[:, h, w]))."""

    needs_crucial_set = True

    def __call__(self, teacher, student):
        log_p = F.log_softmax(_positions(teacher), dim=1)  # (N, C) original
        log_q = F.log_softmax(_positions(student), dim=1)  # (N, C) slim
        return (log_p.exp() * (log_p - log_q)).sum(1).mean()


@MIMIC_LOSSES.register("js")
class JSMimic(MimicLoss):
    """Jensen-Shannon divergence in place of KL; symmetric and bounded by log 2."""

    needs_crucial_set = True

    def __call__(self, teacher, student):
        log_p = F.log_softmax(_positions(teacher), dim=1)
        log_q = F.log_softmax(_positions(student), dim=1)
        log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)  # log((P+Q)/2)
        kl_pm = (log_p.exp() * (log_p - log_m)).sum(1)
        kl_qm = (log_q.exp() * (log_q - log_m)).sum(1)
        return (0.5 * (kl_pm + kl_qm)).mean()


@MIMIC_LOSSES.register("mse")
class MSEMimic(MimicLoss):
    """||relu(X) - relu(X')||_F^2, averaged over elements."""

    def __call__(self, teacher, student):
        return F.mse_loss(student, teacher)


@MIMIC_LOSSES.register("lasso")
class LassoMimic(MimicLoss):
    """L1 norm of the same difference, averaged over elements."""

    def __call__(self, teacher, student):
        return F.l1_loss(student, teacher)
