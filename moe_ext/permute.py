"""Expert-major token layout (permute) and its inverse with the weighted sum (unpermute)."""

import torch

from ._ops import ops


def permute(x, idx, num_experts, pad_to=1, capacity=None, sync=None, x_scale=None):
    """Groups token rows by expert.

    x: [T, H] any dtype (rows move as bytes); idx: [T, k] int32/int64 expert ids, -1 = not routed.
    Returns x_perm [R, H] (rows of expert 0, then expert 1, ...; inside an expert in token order),
    row_map [T, k] int64 (the row of each (token, slot), -1 if dropped or not routed) and
    tokens_per_expert [E] int32: the rows of each expert's segment, rounded up to pad_to (padding
    rows are zero). capacity: each expert keeps its first `capacity` slots in token order.
    sync: True sizes R exactly (on CUDA this reads one count back to the host); False uses the
    worst case (T*k + min(T*k, E)*(pad_to-1)) with zero rows past sum(tokens_per_expert).
    Default: exact on CPU, worst case on CUDA (no host synchronisation). Ids outside
    [-1, num_experts) raise a RuntimeError in exact mode; the worst-case mode on CUDA cannot look
    at them without a sync and treats them as not routed.
    x_scale: optional [T, S] per-row scales (e.g. of fp8 e4m3 rows) that travel with their rows:
    then a fourth output [R, S] holds them in x_perm's layout (zero on padding rows).
    """
    if pad_to < 1:
        raise ValueError(f"moe_ext.permute: pad_to must be >= 1, got {pad_to}")
    if capacity is not None and capacity < 0:
        raise ValueError(f"moe_ext.permute: capacity must be >= 0 or None, got {capacity}")
    exact = (x.device.type == "cpu") if sync is None else bool(sync)
    cap = -1 if capacity is None else capacity
    out = ops.permute(x, idx, num_experts, pad_to, cap, exact)
    if x_scale is None:
        return out
    if x_scale.dim() != 2 or x_scale.shape[0] != x.shape[0]:
        raise ValueError(f"moe_ext.permute: x_scale must be [num_tokens={x.shape[0]}, S], got {tuple(x_scale.shape)}")
    if x_scale.device != x.device:
        raise ValueError(f"moe_ext.permute: x_scale must be on x's device {x.device}, got {x_scale.device}")
    # NOTE: each scale is copied to its row through row_map (slots without a row go to a spare
    # row, dropped): two small kernels, no second routing pass and no second host read of the
    # row count. Rows nothing lands on (padding, the worst-case tail) stay zero.
    x_perm, row_map = out[0], out[1]
    R, k = x_perm.shape[0], idx.shape[1]
    rows = torch.where(row_map >= 0, row_map, R).reshape(-1)
    s_perm = x_scale.new_zeros((R + 1, x_scale.shape[1]))
    s_perm.index_copy_(0, rows, x_scale.repeat_interleave(k, dim=0))
    return (*out, s_perm[:R])


def unpermute(y_perm, row_map, weights=None):
    """out[t] = sum_j weights[t, j] * y_perm[row_map[t, j]] (plain sum without weights).

    y_perm: [R, H] float; row_map: [T, k] int64 from permute; weights: [T, k] float32 (or the
    dtype of y_perm). Accumulates in float32 (float64 for float64), slots in order j = 0..k-1;
    slots with row -1 contribute nothing. Returns [T, H] in the dtype of y_perm.
    """
    return ops.unpermute(y_perm, row_map, weights)
