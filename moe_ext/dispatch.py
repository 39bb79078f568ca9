"""Expert-parallel dispatch / combine.

With a world of one rank (no group, or a group of size 1) dispatch is permute and combine is
unpermute with the routing weights: no communication at all.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .permute import permute, unpermute

_BACKENDS = ("auto", "ipc", "nccl", "gloo")


@dataclass
class DispatchHandle:
    """What combine needs to send expert outputs back: the layout of this dispatch."""
    row_map: torch.Tensor  # [T, k] int64: row of each (token, slot) in recv_x, -1 if not there
    weights: torch.Tensor  # [T, k] routing weights (autograd flows to them through combine)
    num_tokens: int
    world_size: int = 1
    group: Optional[object] = None


def _world_size(group):
    if group is None:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return dist.get_world_size(group)


def dispatch(x, idx, w, num_experts, group=None, backend="auto", async_op=False, pad_to=1, capacity=None):
    """Sends every token to the ranks owning its experts; rows arrive grouped by local expert.

    x: [T, H]; idx: [T, k] global expert ids (-1 = not routed); w: [T, k] float32 weights.
    Returns recv_x [R, H] (expert-major, inside an expert by (source rank, source token)),
    tokens_per_expert [E_local] int32 and the handle for combine.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"moe_ext.dispatch: backend must be one of {_BACKENDS}, got {backend!r}")
    if w.shape != idx.shape:
        raise ValueError(f"moe_ext.dispatch: w must have the shape of idx {tuple(idx.shape)}, got {tuple(w.shape)}")
    world = _world_size(group)
    if world != 1:
        raise NotImplementedError(
            f"moe_ext.dispatch: expert parallelism over {world} ranks is not available in this build yet; "
            "only a world of one rank is")
    recv_x, row_map, tokens_per_expert = permute(x, idx, num_experts, pad_to=pad_to, capacity=capacity)
    return recv_x, tokens_per_expert, DispatchHandle(row_map, w, x.shape[0], world, group)


def combine(y, handle):
    """out[t] = sum_j w[t, j] * y[row of (t, j)], back on the rank that sent token t.

    y: [R, H] expert outputs in the layout dispatch returned. Returns [T, H] in y's dtype.
    """
    if not isinstance(handle, DispatchHandle):
        raise TypeError("moe_ext.combine: handle must be the DispatchHandle returned by moe_ext.dispatch")
    return unpermute(y, handle.row_map, handle.weights)
