"""Grouped expert GEMM."""
import torch

from ._ops import ops

_ACTIVATIONS = {None: "none", "none": "none", "swiglu": "swiglu"}


def grouped_gemm(a, b, tokens_per_expert_or_offsets, trans_b=False, activation=None):
    """y[rows of e] = act(a[rows of e] @ b[e]) for every expert e, in one call.

    a: [M, K]; b: [E, K, N], or [E, N, K] with trans_b; same float dtype, contiguous.
    tokens_per_expert_or_offsets: [E] row counts, or [E+1] offsets starting at 0 (int32/int64).
    Rows past the last expert are allowed and give zero rows. activation: None, or "swiglu"
    (silu(h[:, :N/2]) * h[:, N/2:] on the fp32 accumulator; output [M, N/2]).
    Accumulates in float32 for 16-bit inputs. Returns [M, N] (or [M, N/2]) in the dtype of a.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"moe_ext.grouped_gemm: activation must be None or 'swiglu', got {activation!r}")
    return ops.grouped_gemm(a, b, tokens_per_expert_or_offsets, bool(trans_b), _ACTIVATIONS[activation])
