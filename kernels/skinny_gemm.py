"""The decoding step's weight GEMMs (a few rows of activations times a large weight) as one Triton kernel.

At batch 1-16 a decoding step's linear layers read every weight once and do almost no arithmetic: their time
is the weight bytes over the memory bandwidth, and cuBLAS's few-row GEMMs stay well below it (the profile and
the numbers: kernels/NOTES.md, "The decoding step's weight GEMMs"), which keeps the step off issue 21's floor.

Two kernels, both streaming each weight row once, contiguous along K (coalesced loads), float32 accumulation,
one write of the output in the input's dtype:
- one row (batch 1): one program per ``BLOCK_N`` (2-16) weight rows multiplies them with the activations on
  the CUDA cores (no tensor cores: padding the row to ``tl.dot``'s 16 costs nothing but forces ``BLOCK_N >= 16``,
  which leaves the small projections, N = 1024-4096, with too few programs to keep enough loads in flight on
  132 SMs). More rows do not pay on the CUDA cores (kernels/NOTES.md);
- 2-16 rows: ``tl.dot`` on the rows padded to 16, one program per ``BLOCK_N`` (16-64) weight rows.
No split over K: the partial sums would need a second kernel per GEMM, which at a few microseconds each in a
CUDA graph costs what it would save.

Public API
----------
``skinny_linear(x, weight, bias=None)``: ``x [..., K]`` with at most ``MAX_ROWS`` rows, ``weight [N, K]``
(contiguous, float16/bfloat16/float32), as ``F.linear``. Triton when on CUDA or ``KVBENCH_TRITON=1``
(``TRITON_INTERPRET=1`` on the CPU); otherwise, or for more rows, ``F.linear``. Registered as the custom op
``kvbench::skinny_linear`` so that ``torch.compile`` keeps it whole (and a CUDA graph captures it).
``SkinnyLinear``: an ``nn.Linear``'s replacement holding the same parameters; ``use_skinny_linear(model)`` puts
it in place of every ``nn.Linear`` of a loaded model (opt-in: ``kvbench bench --skinny-gemm``), the model's
class and code untouched. ``python -m kvbench.kernels.skinny_gemm``: the kernel's launch shapes against
``F.linear`` (cuBLAS) on Llama-3.1-8B's projections at 1 and 8 rows, in GB/s and as a share of the copy
bandwidth.

Launch shape: per (N, K, rows bucket), timed once on the first call outside a CUDA-graph capture (the
candidates of ``GEMV_CONFIGS`` or ``DOT_CONFIGS``, and ``F.linear`` itself, which keeps the shapes where cuBLAS
is faster), else the first of them. The timing replays the launches as
a CUDA graph (as the decoding step runs them: timed eagerly, the Python launch's 20-30 us hides the kernel's
2-30 us) over copies of the weight that together overflow the L2 cache (a step reads each weight once; timed
on one 8 MiB weight again and again, the small projections would be read from the L2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decode_attention import _env_true, _launch, pdl_kwargs, use_triton

__all__ = ["skinny_linear", "SkinnyLinear", "use_skinny_linear", "MAX_ROWS"]

MAX_ROWS = 16  # tl.dot's smallest M; more rows are a GEMM cuBLAS serves well

try:  # triton is a dependency, but keep the fallback usable without it
    import triton.language as tl
except Exception:  # pragma: no cover
    tl = None


def _skinny_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, s_xm, s_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr = False,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
    x_rows = x_ptr + rm[:, None] * s_xm
    # The first tile of weights is read before waiting for the kernel before (PDL): no kernel writes weights.
    w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & (rk < K)[None, :], other=0.0)
    if PDL:  # the activations come from the kernel before (decode_attention.pdl_kwargs)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(x_rows + rk[None, :], mask=(rm[:, None] < M) & (rk < K)[None, :], other=0.0)
    if DOT_F32:  # Triton's interpreter multiplies bfloat16 wrongly (as in decode_attention.py)
        w = w.to(tl.float32)
        x = x.to(tl.float32)
    acc = tl.dot(x, tl.trans(w), input_precision=PRECISION, out_dtype=tl.float32)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        wk = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        xk = tl.load(x_rows + k[None, :], mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        if DOT_F32:
            wk = wk.to(tl.float32)
            xk = xk.to(tl.float32)
        acc += tl.dot(xk, tl.trans(wk), input_precision=PRECISION, out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * s_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & n_ok[None, :])


def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, N, K,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
    # The first tile of weights is read before waiting for the kernel before (PDL): no kernel writes weights.
    w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & (rk < K)[None, :], other=0.0)
    if PDL:  # the activations come from the kernel before (decode_attention.pdl_kwargs)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
    acc = w.to(tl.float32) * x[None, :]  # [BLOCK_N, BLOCK_K], reduced over K once, after the loop
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        wk = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        xk = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        acc += wk * xk[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rn, out.to(out_ptr.dtype.element_ty), mask=n_ok)


# (BLOCK_N, BLOCK_K, num_warps, num_stages). Each candidate is one more Triton compilation (about a second) the
# first time a process tunes, so the lists stay short. GEMV: 4-16 KiB of weight a tile; dot: tiles of 8-16 KiB
# of weight, 3-4 loads in flight.
GEMV_CONFIGS = [(bn, bk, w, 3) for bn, bk, w in ((2, 1024, 4), (4, 512, 4), (4, 1024, 4), (4, 1024, 8), (8, 256, 4),
                                                 (8, 512, 4), (8, 512, 8), (8, 1024, 8), (2, 2048, 8), (16, 256, 8))]
DOT_CONFIGS = [(bn, bk, w, s) for bn in (16, 32) for bk in (256, 512) for w in (4, 8) for s in (3, 4)] + [(64, 128, 4, 4)]
CUBLAS = "cublas"  # a tuning outcome: F.linear was the fastest for this shape
_TUNED: dict = {}


def _rows_bucket(m: int) -> int:
    """The tuning key's row count: 1 (the GEMV), 8 or 16 (the dot kernel, rows padded to 16)."""
    return 1 if m == 1 else (8 if m <= 8 else MAX_ROWS)


def _candidates(m: int) -> list:
    return GEMV_CONFIGS if m == 1 else DOT_CONFIGS


def _launch_shape(x2, weight, bias, out, config) -> None:
    M, K = x2.shape
    N = weight.shape[0]
    block_n, block_k, warps, stages = config
    grid = ((N + block_n - 1) // block_n,)
    kwargs = {} if x2.device.type != "cuda" else {"num_warps": warps, "num_stages": stages}
    b = bias if bias is not None else weight
    if M == 1:
        _launch(_gemv_kernel, grid, x2, weight, b, out, N, K, HAS_BIAS=bias is not None, BLOCK_N=block_n,
                BLOCK_K=block_k, **kwargs, **pdl_kwargs(x2))
        return
    dot_f32 = _env_true("TRITON_INTERPRET") and x2.dtype == torch.bfloat16
    _launch(_skinny_kernel, grid, x2, weight, b, out, M, N, K, x2.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION="ieee" if x2.dtype == torch.float32 or dot_f32 else "tf32",
            DOT_F32=dot_f32, **kwargs, **pdl_kwargs(x2))


L2_OVERFLOW = 256 << 20  # bytes of weight copies a timing cycles through: above any GPU's L2 cache (H200: 60 MiB)


def _time(launch, weight: torch.Tensor, reps: int = 20) -> float:
    """Seconds per ``launch(w)`` with ``w`` a copy of ``weight`` (uninitialised: the time does not depend on the
    values), the copies cycling so that each is read from memory, ``reps`` launches replayed as a CUDA graph."""
    copies = [weight] + [torch.empty_like(weight) for _ in range(min(L2_OVERFLOW // max(weight.nbytes, 1), 63))]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and load outside the capture
        for w in copies[:2]:
            launch(w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for i in range(reps):
            launch(copies[i % len(copies)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (3 * reps) / 1e3


def _config_for(x2, weight, bias):
    candidates = _candidates(x2.shape[0])
    if x2.device.type != "cuda":
        return candidates[0]
    key = (weight.shape[0], weight.shape[1], _rows_bucket(x2.shape[0]), weight.dtype, x2.device)
    config = _TUNED.get(key)
    if config is None:
        if torch.cuda.is_current_stream_capturing():  # no timing inside a capture: the first, not remembered
            return candidates[0]
        timings = {CUBLAS: _time(lambda w: F.linear(x2, w, bias), weight)}  # the kernel only where it is faster
        out = torch.empty(x2.shape[0], weight.shape[0], dtype=x2.dtype, device=x2.device)
        for c in candidates:
            try:
                timings[c] = _time(lambda w: _launch_shape(x2, w, bias, out, c), weight)
            except Exception:  # a shape this GPU's shared memory or registers refuse
                continue
        config = _TUNED[key] = min(timings, key=timings.get) if timings else candidates[0]
    return config


def _skinny_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    config = _config_for(x2, weight, bias)
    if config == CUBLAS:
        return F.linear(x, weight, bias)
    out = torch.empty(x2.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    _launch_shape(x2, weight, bias, out, config)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    return (0 < rows <= MAX_ROWS and use_triton(x) and weight.is_contiguous() and x.dtype == weight.dtype
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32))


# The schema written out: inferring it from this module's (string) annotations depends on the torch version.
@torch.library.custom_op("kvbench::skinny_linear", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
def _skinny_op(x, weight, bias):
    return _skinny_triton(x, weight, bias)  # reached only through skinny_linear, which checked _fits


@_skinny_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; through the kernel when ``x`` has at most ``MAX_ROWS`` rows on CUDA."""
    if not _fits(x, weight) or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return F.linear(x, weight, bias)  # training and prefill: cuBLAS (the op has no backward)
    return _skinny_op(x, weight, bias)


class SkinnyLinear(nn.Module):
    """An ``nn.Linear`` whose few-row products go through ``skinny_linear``; the same parameters (and names)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return skinny_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def use_skinny_linear(model: nn.Module) -> int:
    """Every ``nn.Linear`` of ``model`` replaced by a ``SkinnyLinear`` on the same parameters; returns how many
    (0 when done before). The output layer too: at batch 1 it is the largest single read after the layers'."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear]
    for parent, name, child in swaps:
        setattr(parent, name, SkinnyLinear(child))
    return len(swaps)


def main() -> None:  # pragma: no cover - GPU only
    """Llama-3.1-8B's projections at 1, 2 and 8 rows: cuBLAS against every launch shape of the kernel, each timed
    as the step runs them (``_time``: CUDA graph, weights read from memory)."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    y.copy_(x)  # timed eagerly: a 2 GiB copy dwarfs its launch, and captured in a graph it becomes a slower memcpy node
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    end.synchronize()
    bw = 2 * x.numel() * 10 / (start.elapsed_time(end) / 1e3)
    del x, y
    pdl = pdl_kwargs(torch.empty(0, device=dev))["PDL"]
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write); shares below are "
          f"of it, weight bytes over time; the kernel's launches {'with' if pdl else 'without'} programmatic "
          "dependent launch (KVBENCH_PDL)")
    shapes = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336),
              "lm_head": (128256, 4096)}
    per_layer = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1, "lm_head": 0}
    total = {}
    for rows in (1, 2, 8):
        for name, (N, K) in shapes.items():
            w = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
            a = torch.randn(rows, K, device=dev, dtype=dt)
            ref = F.linear(a, w)
            t_cublas = _time(lambda wc: F.linear(a, wc), w)
            out = torch.empty(rows, N, device=dev, dtype=dt)
            timed = {}
            for c in _candidates(rows):
                try:
                    timed[c] = _time(lambda wc: _launch_shape(a, wc, None, out, c), w)
                except Exception as e:
                    print(f"    {c}: {str(e).splitlines()[0][:80]}")
            best = min(timed, key=timed.get)
            _launch_shape(a, w, None, out, best)
            err = (out.float() - ref.float()).abs().max().item()
            nbytes = w.numel() * w.element_size()
            print(f"  rows {rows} {name:8s} N={N:6d} K={K:5d}: cuBLAS {t_cublas * 1e6:7.1f} us "
                  f"({nbytes / t_cublas / bw:6.1%}), kernel {timed[best] * 1e6:7.1f} us ({nbytes / timed[best] / bw:6.1%}) "
                  f"at {best}; max |diff| {err:.3g}")
            t = total.setdefault(rows, [0.0, 0.0, 0.0])
            times = (t_cublas, timed[best], min(t_cublas, timed[best]))  # the last: what the tuning keeps
            for i, v in enumerate(times):
                t[i] += per_layer[name] * v * 32 + (v if name == "lm_head" else 0.0)
            del w
    for rows, (c, k, either) in total.items():
        print(f"rows {rows}: a step's 225 weight GEMMs (32 layers and the output layer), cuBLAS {c * 1e3:.3f} ms, "
              f"kernel {k * 1e3:.3f} ms ({k / c:.3f}x), the faster of the two per shape {either * 1e3:.3f} ms "
              f"({either / c:.3f}x)")


if __name__ == "__main__":
    main()
