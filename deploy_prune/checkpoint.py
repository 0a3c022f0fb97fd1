"""Mid-stage checkpoints: everything a training stage needs to go on as if never stopped.

A checkpoint holds the trained modules (the model, or the scorer's gates), the optimizer and
scheduler, the step reached, the random generators (torch, numpy, Python) and the stage's
seconds so far. The data order is a function of the step (:func:`deploy_prune.train.batches`),
so restoring these is enough for a resumed stage to end bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deploy_prune.artifacts import ArtifactError, check_finite_state
from deploy_prune.train import StepState

log = logging.getLogger(__name__)


def rng_state() -> dict:
    """The global generators' states, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "python": repr(random.getstate())}


def set_rng_state(blob: dict) -> None:
    import ast

    torch.set_rng_state(blob["torch"])
    keys = blob["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, blob["numpy_pos"], 0, 0.0))
    random.setstate(ast.literal_eval(blob["python"]))


class Checkpointer:
    """Writes ``path`` atomically every ``steps // 10`` steps (and at the last) of one stage."""

    def __init__(self, path: Path, modules: dict[str, nn.Module], state: StepState, *,
                 started: float | None = None) -> None:
        self.path, self.modules, self.state = Path(path), modules, state
        self.every = max(1, state.steps // 10)
        self.seconds_before = 0.0  # time spent in earlier segments of this stage
        self.t0 = time.perf_counter() if started is None else started  # this segment's start

    def seconds(self) -> float:
        """Seconds of this stage over all its segments so far."""
        return self.seconds_before + time.perf_counter() - self.t0

    def save(self, step: int) -> None:
        if step % self.every and step != self.state.steps:
            return
        for k, m in self.modules.items():  # never a non-finite checkpoint to resume from
            check_finite_state(m.state_dict(), f"{self.path.stem} checkpoint ({k}) at step {step}")
        blob = {"modules": {k: m.state_dict() for k, m in self.modules.items()},
                "optimizer": self.state.optimizer.state_dict(),
                "scheduler": self.state.scheduler.state_dict() if self.state.scheduler else None,
                "step": step, "rng": rng_state(), "seconds": self.seconds()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(self.path)

    def restore(self) -> bool:
        """Load the checkpoint if there is one; returns whether it did."""
        if not self.path.is_file():
            return False
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
            for k, m in self.modules.items():
                check_finite_state(blob["modules"][k], str(self.path))
                m.load_state_dict(blob["modules"][k])
            self.state.optimizer.load_state_dict(blob["optimizer"])
            if self.state.scheduler is not None and blob["scheduler"] is not None:
                self.state.scheduler.load_state_dict(blob["scheduler"])
        except Exception as e:  # truncated, foreign or non-finite: one line, not a traceback
            raise ArtifactError(f"{self.path}: unreadable checkpoint ({type(e).__name__}); delete it "
                                "to redo this stage from its start") from None
        set_rng_state(blob["rng"])
        self.state.start = int(blob["step"])
        # the last segment's time after its last checkpoint is lost with it
        self.seconds_before = float(blob["seconds"])
        log.info("resumed %s at step %d/%d", self.path.name, self.state.start, self.state.steps)
        return True
