"""Grouped expert GEMM."""
from . import _gemm_masked  # noqa: F401  (fake and autograd of grouped_gemm_masked)
from ._ops import ops

_ACTIVATIONS = {None: "none", "none": "none", "swiglu": "swiglu"}


def grouped_gemm(a, b, tokens_per_expert_or_offsets, trans_b=False, activation=None, bias=None, row_scale=None):
    """y[rows of e] = row_scale[rows] * act(a[rows of e] @ b[e] + bias[e]) for each expert e, in one call.

    a: [M, K]; b: [E, K, N], or [E, N, K] with trans_b; same float dtype, contiguous.
    tokens_per_expert_or_offsets: [E] row counts, or [E+1] offsets starting at 0 (int32/int64).
    Rows past the last expert are allowed and give zero rows. activation: None, or "swiglu"
    (silu(h[:, :N/2]) * h[:, N/2:] on the fp32 accumulator; output [M, N/2]).
    bias: optional [E, N] in the dtype of a, added before the activation (both halves with SwiGLU).
    row_scale: optional [M] floats (e.g. the routing weight of each row), multiplied after it.
    Accumulates in float32 for 16-bit inputs; the epilogue runs on the float32 accumulator and the
    result is rounded once. Returns [M, N] (or [M, N/2]) in the dtype of a. Differentiable in a, b,
    bias and row_scale.
    """
    if not isinstance(activation, (str, type(None))) or activation not in _ACTIVATIONS:
        raise ValueError(f"moe_ext.grouped_gemm: activation must be None or 'swiglu', got {activation!r}")
    return ops.grouped_gemm(a, b, tokens_per_expert_or_offsets, bool(trans_b), _ACTIVATIONS[activation], bias,
                            row_scale)


def swiglu(h):
    """silu(h[:, :n]) * h[:, n:] for h [rows, 2n] (gate | up halves), the grouped GEMM's SwiGLU
    epilogue as a stage of its own: for a caller that keeps h for the backward (the MoE layer in
    training) instead of running the GEMM again. Computed in float32 (float64 for float64) from h's
    values, rounded once; one pass over memory on CUDA. Differentiable (the gradient is one more
    pass: moe_ext::swiglu_backward). Returns [rows, n] in h's dtype."""
    return ops.swiglu(h)


def grouped_gemm_masked(a, b, valid_rows, trans_b=False, activation=None, bias=None, row_scale=None):
    """The masked (decode) layout: y[e, :v_e] = act(a[e, :v_e] @ b[e] (+ bias[e])) (* row_scale[e, :v_e]).

    a: [E, max_rows, K]; b: [E, K, N], or [E, N, K] with trans_b; same float dtype, contiguous.
    v_e = valid_rows[e]: [E] int32/int64 on a's device, each in [0, max_rows] (checked on the CPU; for
    bf16/fp16 on CUDA clamped instead, the counts never read back to the host, so the call is
    CUDA-graph safe; float32/float64 on CUDA take the ATen path, which reads them back and checks).
    activation, bias [E, N]: as grouped_gemm; row_scale: optional [E, max_rows] floats. Returns
    [E, max_rows, N] (or N/2) in the dtype of a, rows past valid_rows[e] zero. Differentiable in
    a, b, bias and row_scale.
    """
    if not isinstance(activation, (str, type(None))) or activation not in _ACTIVATIONS:
        raise ValueError(f"moe_ext.grouped_gemm_masked: activation must be None or 'swiglu', got {activation!r}")
    return ops.grouped_gemm_masked(a, b, valid_rows, bool(trans_b), _ACTIVATIONS[activation], bias, row_scale)
