"""Top-k gating: scores, selection, weights, capacity and the balancing losses."""
from typing import NamedTuple, Optional

import torch

from ._ops import ops


class GatingStats(NamedTuple):
    tokens_per_expert: torch.Tensor  # [E] int32: kept assignments per expert
    aux_loss: torch.Tensor  # [] Switch/GShard load-balancing loss, E * sum_e f_e * P_e
    seq_aux_loss: torch.Tensor  # [] DeepSeek-V3 sequence-level aux loss (0 without seq_len)
    z_loss: torch.Tensor  # [] router z-loss, mean over tokens of logsumexp(logits)^2
    positions: torch.Tensor  # [T, k] int32: slot's position inside its expert, -1 if dropped
    noise: Optional[torch.Tensor]  # [T, E] the noise added to the logits, or None


def topk_gating(logits, k, score="softmax", renormalize=True, expert_bias=None, num_groups=None,
                topk_groups=None, capacity_factor=None, noise_std=0.0, generator=None, seq_len=None,
                noise=None):
    """Routes each token to k experts.

    logits: [T, E] float32/bfloat16/float16/float64 router logits.
    Returns weights [T, k] (float32; float64 for float64 logits), idx [T, k] int32 (best first,
    -1 where dropped by capacity) and a GatingStats.
    score: "softmax" over the E experts or "sigmoid". expert_bias: [E] float32 added for selection
    only. num_groups/topk_groups: group-limited routing (a group's score is the sum of its top-2
    biased scores). capacity_factor: capacity = ceil(cf * T * k / E) per expert, first come first
    kept in token order. noise_std/generator: Gaussian noise added to the logits (noisy top-k);
    or pass the exact `noise` [T, E] to use. seq_len: enables the sequence-level aux loss.
    Ties go to the lower expert index.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError("moe_ext.topk_gating: logits must be a torch.Tensor")
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"moe_ext.topk_gating: k must be an int, got {type(k).__name__}")
    if (num_groups is None) != (topk_groups is None):
        raise ValueError("moe_ext.topk_gating: num_groups and topk_groups must be given together")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"moe_ext.topk_gating: capacity_factor must be > 0 or None, got {capacity_factor}")
    if not noise_std >= 0:
        raise ValueError(f"moe_ext.topk_gating: noise_std must be >= 0, got {noise_std}")
    if seq_len is not None and seq_len <= 0:
        raise ValueError(f"moe_ext.topk_gating: seq_len must be positive or None, got {seq_len}")
    if noise is None and noise_std > 0:
        # NOTE: no generator=None keyword: torch.compile cannot trace randn with it at symbolic sizes
        gen = {} if generator is None else dict(generator=generator)
        noise = torch.randn(logits.shape, device=logits.device, dtype=torch.float32, **gen)
        noise = noise * noise_std
    w, idx, positions, tpe, aux, seq_aux, z = ops.topk_gating(
        logits, k, score, renormalize, expert_bias, num_groups or 0, topk_groups or 0,
        float(capacity_factor or 0.0), noise, seq_len or 0)
    return w, idx, GatingStats(tpe, aux, seq_aux, z, positions, noise)


@torch.no_grad()
def update_expert_bias(expert_bias, tokens_per_expert, rate=1e-3):
    """Auxiliary-loss-free balancing (DeepSeek-V3): bias += rate * sign(mean load - load), in place.

    expert_bias: [E] float32; tokens_per_expert: [E] counts (summed over steps/ranks as the caller
    likes; integer counts, or float loads such as a running average). Overloaded experts get a
    lower bias, underloaded ones a higher bias. The sign is exact: sum(load) - E * load[e], in
    int64 for counts (one kernel on CUDA, no host sync), in float64 for float loads.
    """
    if expert_bias.dim() != 1 or tokens_per_expert.shape != expert_bias.shape:
        raise ValueError("moe_ext.update_expert_bias: expert_bias and tokens_per_expert must both be [E]")
    load = tokens_per_expert.to(expert_bias.device)
    if not load.is_floating_point() and expert_bias.dtype == torch.float32 and expert_bias.is_contiguous():
        ops.update_expert_bias_(expert_bias, load.long(), float(rate))
        return expert_bias
    load = load.double()
    delta = torch.sign(load.sum() - load.numel() * load)
    expert_bias.add_(delta.to(expert_bias.dtype), alpha=rate)
    return expert_bias
