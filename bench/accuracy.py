"""Top-1 accuracy of the artifact actually benchmarked (ONNX session, engine, package, module).

The evaluation set is the test split of the data config the model was made with. Batches are
re-cut to one fixed size and the last one is zero-padded, so static-shape artifacts and
per-shape compiled graphs see only the shape they were warmed up on; padded rows are dropped
before scoring.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from bench.backends import Backend
from deploy_prune.artifacts import ModelPlan
from deploy_prune.data import load_data
from deploy_prune.pipeline import resolve_config

log = logging.getLogger(__name__)
Batch = tuple[torch.Tensor, torch.Tensor]


def eval_set(plan: ModelPlan, *, max_samples: int | None = None, data_root: str | None = None) -> Batch:
    """The test split of the model's own data config, in memory as one (x (N, C, H, W), y (N,)) pair."""
    over = [f"data.max_eval_samples={max_samples}"] if max_samples else []
    over += [f"data.root={data_root}"] if data_root else []
    cfg = resolve_config(plan, None, over)
    data = load_data(cfg.data, seed=cfg.seed)
    log.info("accuracy on %s test split (%s samples)", cfg.data.name,
             getattr(data.test, "num_samples", "?"))
    batches = [(x, y) for x, y in data.test]
    if not batches:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def rebatch(data: Batch, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(x, y, n_real) chunks of exactly ``size`` rows; the last is zero-padded to ``size``."""
    xs, ys = data
    for i in range(0, len(ys), size):
        x, y = xs[i:i + size], ys[i:i + size]
        n = len(y)
        if n < size:
            x = torch.cat([x, x.new_zeros(size - n, *x.shape[1:])])
        yield x.contiguous(), y, n


def top1(backend: Backend, data: Batch, *, batch_size: int) -> tuple[float, int]:
    """Percent of samples whose highest logit is the label, and the number of samples."""
    correct = total = 0
    for x, y, n in rebatch(data, batch_size):
        logits = backend.download(backend.run(backend.upload(x)))[:n]  # (n, K)
        correct += int((logits.argmax(dim=1) == y).sum())
        total += n
    if total == 0:
        raise ValueError("the evaluation set is empty")
    return 100.0 * correct / total, total
