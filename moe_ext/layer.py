"""The MoE layer: router -> topk_gating -> dispatch -> grouped GEMM (SwiGLU) -> grouped GEMM -> combine."""
import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .dispatch import combine, dispatch
from .gemm import grouped_gemm
from .routing import GatingStats, topk_gating, update_expert_bias


def _ep_world(group):
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP (the shared experts): down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden, ffn_hidden, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(hidden, ffn_hidden, **kw), nn.Linear(hidden, ffn_hidden, **kw)
        self.down_proj = nn.Linear(ffn_hidden, hidden, **kw)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """A Mixture-of-Experts SwiGLU layer with expert parallelism over `ep_group`.

    hidden H, ffn_hidden F (per expert), num_experts E (global), k experts per token.
    ep_group: a torch.distributed ProcessGroup over which the E experts are split in contiguous
    blocks of E / W (None: every expert on this rank, no communication).
    Routing (see moe_ext.topk_gating): score "softmax" | "sigmoid", renormalize, num_groups /
    topk_groups, capacity_factor, noise_std (training only), expert_bias=True for
    auxiliary-loss-free balancing (a float32 buffer updated by `update_expert_bias`),
    routed_scaling_factor multiplies the routing weights. router_dtype: the router's matmul dtype
    (default: float32, or float64 for float64 inputs).
    shared_ffn_hidden > 0 adds a shared SwiGLU expert on every token (DeepSeek/Qwen);
    shared_expert_gate=True scales it by sigmoid(x @ g) per token (Qwen2-MoE).
    Weights: router.weight [E, H]; w1 [E_local, H, 2F] (gate | up halves); w2 [E_local, F, H].
    After each forward, `layer.stats` holds the GatingStats (aux_loss, seq_aux_loss for [B, S, H]
    inputs, z_loss, tokens_per_expert); the caller chooses the loss coefficients.
    """

    def __init__(self, hidden, ffn_hidden, num_experts, k, ep_group=None, *, score="softmax", renormalize=True,
                 num_groups=None, topk_groups=None, capacity_factor=None, noise_std=0.0, expert_bias=False,
                 routed_scaling_factor=1.0, shared_ffn_hidden=0, shared_expert_gate=False,
                 router_dtype=None, pad_to=1, backend="auto", device=None, dtype=None):
        super().__init__()
        world, rank = _ep_world(ep_group)
        if num_experts % world != 0:
            raise ValueError(f"moe_ext.MoE: num_experts={num_experts} must be a multiple of the EP world size {world}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"moe_ext.MoE: k must be in [1, num_experts={num_experts}], got {k}")
        self.hidden, self.ffn_hidden, self.num_experts, self.k = hidden, ffn_hidden, num_experts, k
        self.ep_group, self.ep_world, self.ep_rank = ep_group, world, rank
        self.num_local_experts = num_experts // world
        self.routing = dict(score=score, renormalize=renormalize, num_groups=num_groups, topk_groups=topk_groups,
                            capacity_factor=capacity_factor)
        self.noise_std, self.routed_scaling_factor = noise_std, routed_scaling_factor
        self.router_dtype, self.pad_to, self.backend = router_dtype, pad_to, backend

        kw = dict(device=device, dtype=dtype)
        self.router = nn.Linear(hidden, num_experts, bias=False, **kw)
        self.w1 = nn.Parameter(torch.empty(self.num_local_experts, hidden, 2 * ffn_hidden, **kw))
        self.w2 = nn.Parameter(torch.empty(self.num_local_experts, ffn_hidden, hidden, **kw))
        self.register_buffer("expert_bias", torch.zeros(num_experts, device=device) if expert_bias else None)
        # Kept assignments per expert since the last bias update / reset (this rank's tokens).
        self.register_buffer("load", torch.zeros(num_experts, dtype=torch.int64, device=device), persistent=False)
        self.shared = SwiGLU(hidden, shared_ffn_hidden, **kw) if shared_ffn_hidden else None
        self.shared_gate = nn.Linear(hidden, 1, bias=False, **kw) if shared_expert_gate else None
        self.stats: Optional[GatingStats] = None
        self.reset_parameters()

    @property
    def first_local_expert(self):
        return self.ep_rank * self.num_local_experts

    @torch.no_grad()
    def reset_parameters(self):
        # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for each expert's projections.
        for w, fan_in in ((self.w1, self.hidden), (self.w2, self.ffn_hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            w.uniform_(-bound, bound)

    def route(self, x2, seq_len=None):
        """x2 [T, H] -> (weights [T, k] float32, idx [T, k] int32, GatingStats)."""
        # The router runs in float32 at least (float64 stays float64) unless router_dtype says otherwise.
        rd = self.router_dtype or torch.promote_types(x2.dtype, torch.float32)
        logits = F.linear(x2.to(rd), self.router.weight.to(rd))
        noise_std = self.noise_std if self.training else 0.0
        w, idx, stats = topk_gating(logits, self.k, expert_bias=self.expert_bias, noise_std=noise_std,
                                    seq_len=seq_len, **self.routing)
        if self.routed_scaling_factor != 1.0:
            w = w * self.routed_scaling_factor
        return w, idx, stats

    def experts(self, recv_x, tokens_per_expert):
        """The local experts over their rows: [R, H] grouped by local expert -> [R, H]."""
        h = grouped_gemm(recv_x, self.w1, tokens_per_expert, activation="swiglu")
        return grouped_gemm(h, self.w2, tokens_per_expert)

    def forward(self, x):
        shape = x.shape
        if shape[-1] != self.hidden:
            raise ValueError(f"moe_ext.MoE: x must end in hidden={self.hidden}, got shape {tuple(shape)}")
        x2 = x.reshape(-1, self.hidden)
        seq_len = shape[-2] if x.dim() == 3 and shape[-2] > 0 else None
        w, idx, stats = self.route(x2, seq_len)
        recv_x, tokens_per_expert, handle = dispatch(x2, idx, w, self.num_experts, group=self.ep_group,
                                                     backend=self.backend, pad_to=self.pad_to)
        out = combine(self.experts(recv_x, tokens_per_expert), handle)
        if self.shared is not None:
            s = self.shared(x2)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x2)) * s
            out = out + s
        self.stats = stats
        with torch.no_grad():
            self.load += stats.tokens_per_expert.to(self.load.device, torch.int64)
        return out.view(shape)

    @torch.no_grad()
    def global_load(self):
        """Kept assignments per expert since the last update, summed over the EP group: [E] int64."""
        load = self.load.clone()
        if self.ep_world > 1:
            dist.all_reduce(load, group=self.ep_group)
        return load

    @torch.no_grad()
    def update_expert_bias(self, rate=1e-3):
        """Auxiliary-loss-free balancing step (DeepSeek-V3): bias += rate * sign(mean load - load),
        from the load over the whole EP group since the last update; then resets the load.
        Every rank of the EP group must call it (it all-reduces the load)."""
        if self.expert_bias is None:
            raise RuntimeError("moe_ext.MoE.update_expert_bias: build the layer with expert_bias=True")
        update_expert_bias(self.expert_bias, self.global_load(), rate)
        self.load.zero_()
        return self.expert_bias

    @classmethod
    def from_hf(cls, block, ep_group=None, **kwargs):
        """Builds the layer from a transformers MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE,
        DeepSeek-V3), copying its weights; each rank of ep_group takes its own experts."""
        from .hf import moe_from_hf

        return moe_from_hf(block, ep_group=ep_group, **kwargs)

    def extra_repr(self):
        return (f"hidden={self.hidden}, ffn_hidden={self.ffn_hidden}, num_experts={self.num_experts}, k={self.k}, "
                f"ep={self.ep_rank}/{self.ep_world}, local_experts={self.num_local_experts}")
