"""Expert-major token layout (permute) and its inverse with the weighted sum (unpermute)."""

import torch

from ._ops import ops


def permute(x, idx, num_experts, pad_to=1, capacity=None, sync=None, x_scale=None, max_rows=None):
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
    max_rows: the masked layout that grouped_gemm_masked reads (dispatch's sync=False layout at a
    world of one): x_perm is [E, max_rows, H], expert e's rows first in token order, then zeros;
    each expert keeps its first max_rows slots (min(capacity, max_rows) with a capacity);
    tokens_per_expert holds the kept (valid) rows, and row_map the rows of x_perm viewed as
    [E * max_rows, H]. Its size is known without looking at idx: no host synchronisation on CUDA
    (unless sync=True, which only adds the check of the ids). Takes no pad_to.
    """
    if pad_to < 1:
        raise ValueError(f"moe_ext.permute: pad_to must be >= 1, got {pad_to}")
    if capacity is not None and capacity < 0:
        raise ValueError(f"moe_ext.permute: capacity must be >= 0 or None, got {capacity}")
    if max_rows is not None and (max_rows < 1 or pad_to != 1):
        raise ValueError(f"moe_ext.permute: max_rows must be None or >= 1, with pad_to 1; got max_rows={max_rows}, "
                         f"pad_to={pad_to}")
    exact = (x.device.type == "cpu") if sync is None else bool(sync)
    cap = -1 if capacity is None else capacity
    if max_rows is None:
        out = ops.permute(x, idx, num_experts, pad_to, cap, exact)
    else:
        out = ops.permute(x, idx, num_experts, pad_to, cap, exact, max_rows)
    if x_scale is None:
        return _masked_view(out, max_rows)
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
    return (*_masked_view(out, max_rows), s_perm[:R])


def _masked_view(out, max_rows):
    if max_rows is None:
        return out
    x_perm, row_map, tokens_per_expert = out
    return x_perm.view(tokens_per_expert.shape[0], max_rows, x_perm.shape[1]), row_map, tokens_per_expert


def unpermute(y_perm, row_map, weights=None):
    """out[t] = sum_j weights[t, j] * y_perm[row_map[t, j]] (plain sum without weights).

    y_perm: [R, H] float; row_map: [T, k] int64 from permute; weights: [T, k] float32 (or the
    dtype of y_perm). Accumulates in float32 (float64 for float64), slots in order j = 0..k-1;
    slots with row -1 contribute nothing. Returns [T, H] in the dtype of y_perm. The backward
    needs each row used by at most one slot, as in permute's row_map (on CPU a repeated row is an
    error there; the CUDA kernel does not check).
    """
    return ops.unpermute(y_perm, row_map, weights)
