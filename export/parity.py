"""Parity: an exported artifact must compute what the PyTorch model computes.

Each exporter runs its artifact and the source model on the same seeded random inputs at two
batch sizes (1 and 7 by default, so a broken dynamic batch axis shows) and raises
:class:`ParityError` when any output element differs by more than ``atol' + rtol * |reference|``,
the rule of :func:`torch.allclose`, where ``atol' = atol * min(1, max|reference|) + 1e-5 *
max|reference|``: relative to the output's scale when outputs are small (so ~1e-14 outputs cannot
pass vacuously), the absolute floor on outputs of normal size, and float32's rounding allowed for
on huge ones. The maximum absolute difference per batch is returned so
that it can be logged and recorded next to the artifact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from export.errors import ParityError

log = logging.getLogger(__name__)

Runner = Callable[[torch.Tensor], torch.Tensor]


def check_example(example: object) -> None:
    """An example input must be a float (B, C, H, W) tensor: the image models' one input."""
    if not isinstance(example, torch.Tensor) or example.dim() != 4 or not example.is_floating_point():
        got = tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
        raise TypeError(f"example must be a float (B, C, H, W) tensor, got {got}")


def probe_inputs(shape: Sequence[int], batches: Sequence[int], *, seed: int = 0) -> list[torch.Tensor]:
    """Seeded standard-normal inputs of ``(b, *shape)`` for each batch size ``b`` (CPU, float32)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((b, *shape), generator=g) for b in batches]  # (B, C, H, W)


# float32 rounding in a sum of terms of size S leaves an absolute error of about sqrt(n) * eps * S
# in every output, however small that output ends up: an allowance of 1e-5 of the output scale
# (a 2048-term dot product: ~3e-6). A wrong export is off by a sizeable fraction of the scale.
SCALE_SLACK = 1e-5


def relative_atol(atol: float, ref: torch.Tensor) -> float:
    """``atol * min(1, max|ref|) + SCALE_SLACK * max|ref|``: relative to the output's scale.

    A fixed absolute tolerance passes anything when the outputs themselves are far below it
    (logits around 1e-14 agree with any other values around 1e-14); scaled to the output, it
    keeps meaning "agree to a fraction ``atol`` of the output's size". On outputs of normal size
    (max|ref| about 1-10) it is essentially the given absolute floor. On huge outputs (random
    Inception-v3 logits reach 4e7) float32 rounding alone moves the *small* outputs by ~1e-6 of
    the scale, which ``rtol * |reference|`` does not cover: the slack term does.
    """
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return atol * min(1.0, scale) + SCALE_SLACK * scale


def check_close(out: torch.Tensor, ref: torch.Tensor, *, rtol: float, atol: float, what: str) -> float:
    """Max absolute difference of ``out`` from ``ref``; raises ParityError beyond tolerance.

    The rule is :func:`torch.allclose`'s ``|out - ref| <= atol' + rtol * |ref|`` with
    ``atol' = relative_atol(atol, ref)``, so tiny outputs that differ completely fail."""
    out, ref = out.detach().float().cpu(), ref.detach().float().cpu()
    if out.shape != ref.shape:
        raise ParityError(f"{what}: output shape {tuple(out.shape)} differs from PyTorch's "
                          f"{tuple(ref.shape)}")
    diff = float((out - ref).abs().max()) if out.numel() else 0.0
    if not torch.isfinite(out).all() and torch.isfinite(ref).all():
        raise ParityError(f"{what}: output has NaN/Inf where PyTorch's is finite")
    a = relative_atol(atol, ref)
    if not torch.allclose(out, ref, rtol=rtol, atol=a):
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        raise ParityError(f"{what}: output differs from PyTorch by up to {diff:.3g} at an output "
                          f"scale max|ref| {scale:.3g} (tolerance atol {a:.3g} = {atol:g} * "
                          f"min(1, max|ref|) + {SCALE_SLACK:g} * max|ref|, + rtol {rtol:g} * |reference|)")
    return diff


def check_parity(run: Runner, reference: Runner, shape: Sequence[int], batches: Sequence[int], *,
                 rtol: float, atol: float, what: str) -> dict[int, float]:
    """Run ``run`` and ``reference`` on the same probes; batch size -> max absolute difference."""
    diffs: dict[int, float] = {}
    for x in probe_inputs(shape, batches):
        with torch.no_grad():
            ref = reference(x)
        diffs[x.shape[0]] = check_close(run(x), ref, rtol=rtol, atol=atol,
                                        what=f"{what} at batch {x.shape[0]}")
    log.info("%s matches PyTorch: %s", what,
             ", ".join(f"batch {b} max|diff| {d:.2e}" for b, d in diffs.items()))
    return diffs


# (rtol, atol) against PyTorch fp32 logits per precision, for TensorRT engines and fp16 ONNX
# exports; unless given explicitly, atol is scaled by the logits' magnitude (scaled_atol).
DEFAULT_TOLERANCE = {"fp32": (1e-3, 1e-3), "tf32": (1e-2, 1e-2), "fp16": (2e-2, 2e-2),
                     "bf16": (5e-2, 5e-2), "int8": (1e-1, 1e-1)}


def tolerance(precision: str, reference: Runner, chw: Sequence[int], rtol: float | None,
              atol: float | None) -> tuple[float, float]:
    """(rtol, atol) at ``precision``; explicit values win, atol scaled by ``reference``'s logits."""
    r, a = DEFAULT_TOLERANCE[precision]
    return (r if rtol is None else rtol), (scaled_atol(a, reference, chw) if atol is None else atol)


def scaled_atol(atol: float, reference: Runner, shape: Sequence[int]) -> float:
    """``atol`` times the reference's output scale max|ref| (when above 1) on a batch-1 probe.

    Reduced-precision rounding (TF32, fp16, int8) grows with the magnitudes summed into an
    output, not with each output element, so a fixed atol would fail large-logit models.
    """
    with torch.no_grad():
        scale = float(reference(probe_inputs(shape, (1,))[0]).abs().max())
    return atol * max(scale, 1.0)


def batches_in_range(lo: int, hi: int, wanted: Sequence[int] = (1, 7)) -> tuple[int, ...]:
    """The wanted probe batch sizes clipped into ``[lo, hi]``, without duplicates."""
    return tuple(sorted({max(lo, min(hi, b)) for b in wanted}))


def top1_agreement(run: Runner, reference: Runner, batches, *, max_samples: int = 512,
                   minimum: float = 0.99, what: str) -> tuple[float, int]:
    """Fraction of real inputs on which ``run`` and ``reference`` pick the same class.

    ``batches`` yields (inputs, labels) or inputs; at most ``max_samples`` are used. Random
    probes check the numbers; this checks the decision on the data the model was made for.
    Raises ParityError below ``minimum``; returns (agreement, samples)."""
    agree = n = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        x = x[: max_samples - n].float()
        with torch.no_grad():
            a, b = run(x).argmax(1), reference(x).argmax(1)
        agree += int((a == b).sum())
        n += x.shape[0]
        if n >= max_samples:
            break
    if n == 0:
        raise ParityError(f"{what}: no real inputs to compare top-1 on")
    frac = agree / n
    if frac < minimum:
        raise ParityError(f"{what}: top-1 agrees with PyTorch on only {100 * frac:.1f}% of {n} real "
                          f"inputs (at least {100 * minimum:.0f}% required)")
    return frac, n
