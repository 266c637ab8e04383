"""Fast matrix products for rank's replays on CPU: oneDNN float32 linears (the same arithmetic as torch's,
about 2x faster where the default BLAS lacks an AVX-512 path) and the `--matmul` precision (float32 products,
or float32 tensors whose products round their inputs to bfloat16 and accumulate in float32)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from rys_forge.errors import UsageError

#: `rank --matmul` choices. float32: exact float32 products. bf16: oneDNN's bf16 math mode for float32
#: products (inputs rounded to bfloat16, float32 accumulation and outputs; the residual stream, norms and
#: statistics stay float32/float64). auto: bf16 where this CPU measurably gains from it, else float32.
MATMUL_MODES = ("auto", "float32", "bf16")

#: auto picks bf16 only when a model-sized product runs at least this much faster in it.
BF16_MIN_SPEEDUP = 1.3


def resolve_matmul(mode: str, model: nn.Module) -> str:
    """The precision a run uses for `mode` on `model`: "float32" or "bf16" (stored in the run folder).

    bf16 applies to a float32 model on CPU (where oneDNN has a bf16 math mode); auto measures a product of
    the model's largest layer shape both ways and takes bf16 only if it is `BF16_MIN_SPEEDUP` times faster.

    Raises:
        UsageError: an unknown mode, or bf16 asked for where it cannot apply.
    """
    check_matmul_mode(mode)
    if mode == "float32":
        return mode
    weight = next((p for p in model.parameters() if p.dim() == 2), None)
    on_cpu = weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32
    supported = on_cpu and bf16_math_available()
    if mode == "bf16" and not supported:
        raise UsageError("--matmul bf16 needs a float32 model on a CPU where oneDNN's bf16 math mode rounds only "
                         "the inputs (bfloat16 inputs, float32 sums); use --matmul float32 (on a GPU, load the "
                         "model with --dtype bfloat16 instead)")
    if mode == "bf16":
        return mode
    return "bf16" if supported and _bf16_speedup(model) >= BF16_MIN_SPEEDUP else "float32"


def check_matmul_mode(mode: str) -> None:
    """Raises UsageError (one line) unless `mode` is one of `MATMUL_MODES`."""
    if mode not in MATMUL_MODES:
        raise UsageError(f"--matmul {mode!r}: choose {', '.join(MATMUL_MODES)}")


@contextmanager
def matmul_precision(mode: str) -> Iterator[None]:
    """While active, CPU float32 matrix products run in `mode` ("float32" or "bf16", from `resolve_matmul`);
    the previous setting comes back afterwards."""
    if mode != "bf16":
        yield
        return
    backend = torch.backends.mkldnn.matmul
    previous = backend.fp32_precision
    backend.fp32_precision = "bf16"
    try:
        yield
    finally:
        backend.fp32_precision = previous


def bf16_math_available() -> bool:
    """Whether this torch build can run float32 products in oneDNN's bf16 math mode on this CPU, and there
    the mode rounds only the inputs: a product equals the float64 product of bfloat16-rounded inputs up to
    float32 summation. On an AMD EPYC with AVX512-BF16 but no AMX its results were off by ~3e-3 relative
    (bfloat16-level), several times the input rounding's own error: not the arithmetic `--matmul bf16` states."""
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if not (matmul is not None and hasattr(matmul, "fp32_precision") and torch.backends.mkldnn.is_available()
            and check is not None and bool(check())):
        return False
    return _rounds_only_the_inputs()


@functools.lru_cache(maxsize=1)
def _rounds_only_the_inputs() -> bool:
    """One `[64, 256] x [256, 192]` product in bf16 math mode against float64 on bfloat16-rounded inputs."""
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=generator), torch.randn(192, 256, generator=generator)
    rounded = x.bfloat16().double() @ w.bfloat16().double().T
    with matmul_precision("bf16"):
        fast = torch.nn.functional.linear(x, w).double()
    return float((fast - rounded).abs().max()) <= 1e-5 * float(rounded.abs().max())


def _bf16_speedup(model: nn.Module, tokens: int = 512, repeats: int = 3) -> float:
    """How much faster a `[tokens, in] x [in, out]` product of the model's largest linear (the LM head
    aside: the largest of the decoder's) runs in bf16 math mode than in float32, best of `repeats`.

    The float32 side is the path a float32 run takes: oneDNN's op where `fast_linears` would switch to it
    (on an AMD EPYC, torch's default float32 linear is the slower MKL path, and against that bf16 looked
    1.3x faster while a float32 run through oneDNN was as fast)."""
    shapes = [tuple(m.weight.shape) for m in model.modules() if type(m) is nn.Linear and m.weight.dim() == 2]
    head = max(shapes, key=lambda s: s[0] * s[1], default=None)
    inner = [s for s in shapes if s != head] or shapes
    if not inner:
        return 1.0
    out_features, in_features = max(inner, key=lambda s: s[0] * s[1])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=generator)
    w = torch.randn(out_features, in_features, generator=generator)

    def best(product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
        times = []
        for _ in range(repeats + 1):  # the first call warms up
            start = time.perf_counter()
            product(x, w)
            times.append(time.perf_counter() - start)
        return min(times[1:])

    plain = best(torch.nn.functional.linear)
    onednn = _onednn_linear_op()
    if onednn is not None:
        plain = min(plain, best(lambda a, b: onednn(a, b, None, "none", [], "")))
    with matmul_precision("bf16"):
        fast = best(torch.nn.functional.linear)
    return plain / max(fast, 1e-12)


def _onednn_linear_op() -> Callable[..., torch.Tensor] | None:
    """oneDNN's dense linear (`torch.ops.mkldnn._linear_pointwise`, what torch.compile uses on CPU), if this
    torch build has it and it gives float32 products within float32 rounding of a float64 reference."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    x, w, b = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) for shape in ((3, 5, 64), (48, 64), (48,)))
    try:
        error = (op(x, w, b, "none", [], "").double() - (x.double() @ w.double().T + b.double())).abs().max()
    except (RuntimeError, TypeError):  # an op of another signature
        return None
    scale = x.abs().max() * w.abs().sum(dim=1).max()  # bounds every |output|; float32 rounding is ~1e-7 of it
    return op if float(error) <= 1e-5 * float(scale) else None


@contextmanager
def fast_linears(model: nn.Module) -> Iterator[int]:
    """While active, the model's float32 `nn.Linear` layers on CPU run on oneDNN instead of torch's default
    BLAS; yields how many were switched (0: none, e.g. on a GPU or without oneDNN).

    Where the default BLAS (MKL) has no AVX-512 path, AMD EPYC for one, oneDNN's float32 products run about
    2x faster (a gemma-3-270m layer on one core of a 2-core AMD EPYC: 0.037 s -> 0.019 s; the same float32
    arithmetic, results equal within float32 rounding, 4e-7 relative). Only calls without autograd take
    it (rank's replays run under `torch.no_grad`); the Jacobian's JVP/VJP fall back to `F.linear`.
    A model placed by accelerate (`--device-map`: hooks that move weights in and out per call) is left alone,
    and so is every model while `matmul_precision("bf16")` is active (torch's linear already takes oneDNN then).
    """
    dispatched = any(hasattr(m, "_hf_hook") for m in model.modules())
    bf16_math = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None) == "bf16"
    op = None if dispatched or bf16_math else _onednn_linear_op()
    linears = [m for m in model.modules() if op is not None and type(m) is nn.Linear and m.weight.device.type == "cpu"
               and m.weight.dtype == torch.float32 and "forward" not in m.__dict__]
    for module in linears:
        module.forward = functools.partial(_onednn_forward, op, module)  # shadows nn.Linear.forward
    try:
        yield len(linears)
    finally:
        for module in linears:
            if getattr(module.__dict__.get("forward"), "func", None) is _onednn_forward:
                del module.forward


def _onednn_forward(op: Callable[..., torch.Tensor], m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward` of `m` through oneDNN's `op` when no gradient is needed."""
    if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
        return torch.nn.functional.linear(x, m.weight, m.bias)
    return op(x.contiguous(), m.weight, m.bias, "none", [], "")
