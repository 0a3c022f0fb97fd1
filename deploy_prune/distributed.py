"""Data-parallel scale-out under ``torchrun``: NCCL on GPUs, gloo on CPU.

Every rank takes its strided slice of each *global* batch (see ``TensorLoader``), so a step
over W ranks sees exactly the samples of one single-process step; gradients are averaged
across ranks (DistributedDataParallel for the trained model, an explicit all-reduce for
parameters outside it, such as the beta gates), so results match one process within
floating-point tolerance. Ranks compute identical models; rank 0 owns the outputs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)
T = TypeVar("T")


def launched() -> bool:
    """True in a worker that torchrun started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    log.info("rank %d/%d joined (%s)", rank(), world(), backend)


def shutdown(ok: bool) -> None:
    """Leave the process group in order; every rank calls it once, at the end of the command.

    Destroying the group while a peer still waits in a collective aborts that peer, and so does
    a rank that finished first tearing its interpreter down under gloo's threads. So the ranks
    first agree, in one all-reduce, on whether any of them failed, and then destroy the group
    together (``cli.entry`` then skips interpreter teardown; its docstring says why). If a peer
    is already gone, there is nothing left to leave in order.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if active():
        on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        failed = torch.tensor([0 if ok else 1], device=on)  # NCCL reduces CUDA tensors only
        try:
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        except RuntimeError as e:  # a peer died mid-command: torchrun is stopping the job
            log.warning("rank %d could not reach its peers at exit: %s", rank(), e)
            return
        if failed.item() and ok:
            log.warning("rank %d finished, but another rank failed", rank())
    dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def from_main(make: Callable[[], T]) -> T:
    """``make()`` on rank 0, its result sent to every rank (for results that differ per rank)."""
    if not active():
        return make()
    box = [make() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (one all-reduce; every rank must call it together), so
    all ranks stop at the same step when one of them sees a non-finite loss."""
    if not active():
        return flag
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], device=on)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sync_grads(params: list[torch.Tensor]) -> None:
    """Average gradients over ranks (for parameters DDP does not manage)."""
    if not active():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world())


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics drift with each rank's shard)."""
    if not active():
        return
    for b in model.buffers():
        dist.broadcast(b, src=0)


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, list[torch.Tensor]]:
    """DDP-wrap ``model`` when it owns the trained parameters; returns (model, params to sync by hand)."""
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    if not active():
        return model, []
    owned = {id(p) for p in model.parameters() if p.requires_grad}
    if trained and all(id(p) in owned for p in trained):
        device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids), []
    return model, trained


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
