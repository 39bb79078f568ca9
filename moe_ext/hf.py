"""Hugging Face drop-in: build a moe_ext.MoE from a transformers MoE block, or swap every such block in a model.

    layer = moe_ext.MoE.from_hf(model.model.layers[3].mlp, ep_group=group)
    num_swapped = moe_ext.hf.patch_model(model, ep_group=group)
    ep, tp = moe_ext.parallel.make_groups(2, 2)     # EP x TP; placement=... replicates experts
    num_swapped = moe_ext.hf.patch_model(model, ep_group=ep, tp_group=tp)

Recognised blocks (by class name, so no model module is imported here), all with SwiGLU experts
stored by transformers >= 5 as fused 3-D parameters gate_up_proj [E, 2F, H] (gate rows first) and
down_proj [E, H, F]:

| block                  | scores  | top-k weights                      | router matmul | extras                       |
|------------------------|---------|------------------------------------|---------------|------------------------------|
| MixtralSparseMoeBlock  | softmax | always renormalised                | model dtype   | input jitter (training)      |
| Qwen2MoeSparseMoeBlock | softmax | renormalised iff norm_topk_prob    | model dtype   | shared expert * sigmoid gate |
| Qwen3MoeSparseMoeBlock | softmax | renormalised iff norm_topk_prob    | model dtype   |                              |
| DeepseekV3MoE          | sigmoid | renormalised iff norm_topk_prob,   | float32       | shared experts, group-limited|
|                        |         | then * routed_scaling_factor       |               | selection, selection bias    |

and transformers' copies of them (same code but for names): MiniMax (as Mixtral); Qwen3-Next
(as Qwen2-MoE); Qwen3.5-MoE (as Qwen2-MoE, always renormalised); OLMoE, FlexOlmo, Mellum (as
Qwen3-MoE); Qwen3-VL-MoE's text blocks (as Qwen3-MoE, always renormalised); DeepSeek-V3.2, dots.llm1,
GLM-4.5 (Glm4Moe), Glm4MoeLite, GlmMoeDsa, Kimi-Linear, BailingHybrid, Solar-Open (as
DeepSeek-V3). `SUPPORTED_BLOCKS` lists the class names.

Known numerical differences, all of the order of the dtype's rounding: Qwen rounds the top-k
weights to the model dtype before scaling the expert outputs, moe_ext keeps them in float32;
DeepSeek-V3 divides by (sum + 1e-20), moe_ext by the plain sum (in float32 they differ only when
the k sigmoid scores sum below ~1e-13); for float64 models Mixtral and Qwen take the softmax in
float32, moe_ext in float64 (DeepSeek-V3's float32 router is reproduced exactly).
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layer import MoE

__all__ = ["SUPPORTED_BLOCKS", "moe_from_hf", "patch_model"]

_SILU_ACTS = ("silu", "swish")
_SILU_MODULES = ("SiLU", "SiLUActivation")


class _Source(NamedTuple):
    """What one HF block contributes to the layer: MoE kwargs and the tensors to copy."""
    kwargs: dict  # hidden, ffn_hidden, num_experts, k and the routing options of MoE
    router_weight: torch.Tensor  # [E, H]
    gate_up: torch.Tensor  # [E, H, 2F] (gate | up along the last dim), a view of the block's parameter
    down: torch.Tensor  # [E, F, H]
    expert_params: tuple  # the block's expert parameters (their requires_grad is mirrored)
    shared: Optional[nn.Module]  # gate_proj / up_proj / down_proj MLP, or None
    shared_gate: Optional[nn.Linear]  # Linear(H, 1), or None
    expert_bias: Optional[torch.Tensor]  # [E] selection-only bias, or None
    input_jitter: float  # Mixtral's router_jitter_noise (training only)
    router_logits_fp32: bool  # transformers computes (and records) the router logits in float32


def _check_silu(owner, act_fn, act_name=None):
    name = type(act_fn).__name__
    if name not in _SILU_MODULES or (act_name is not None and act_name not in _SILU_ACTS):
        raise ValueError(f"moe_ext.MoE.from_hf: {owner} uses activation {act_name or name!r}; moe_ext's experts are "
                         f"SwiGLU (silu) only")


def _experts(block):
    """The block's fused experts in moe_ext's layout: (gate_up [E, H, 2F], down [E, F, H], params)."""
    experts = block.experts
    owner = f"{type(block).__name__}.experts"
    if getattr(experts, "_is_expert_parallel", False):
        raise ValueError(f"moe_ext.MoE.from_hf: {owner} is already sharded by transformers' expert parallelism; "
                         f"load the model unsharded and pass ep_group instead")
    for flag, supported in (("has_bias", False), ("has_gate", True), ("has_post_expert_norm", False)):
        if getattr(experts, flag, supported) != supported:
            raise ValueError(f"moe_ext.MoE.from_hf: {owner}.{flag}={not supported} is not supported")
    config = getattr(experts, "config", None)
    _check_silu(owner, experts.act_fn, getattr(config, "hidden_act", None))
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if not getattr(experts, "is_transposed", False):  # [E, 2F, H], [E, H, F] -> [E, H, 2F], [E, F, H]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    if not getattr(experts, "is_concatenated", True):  # interleaved g0 u0 g1 u1 ... -> gate | up
        gate_up = torch.cat([gate_up[..., 0::2], gate_up[..., 1::2]], dim=-1)
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[2] != 2 * down.shape[1]:
        raise ValueError(f"moe_ext.MoE.from_hf: {owner} has gate_up_proj {tuple(experts.gate_up_proj.shape)} and "
                         f"down_proj {tuple(experts.down_proj.shape)}, not [E, 2F, H] and [E, H, F]")
    return gate_up, down, (experts.gate_up_proj, experts.down_proj)


def _shared_mlp(block, name):
    mlp = getattr(block, name, None)
    if mlp is None or mlp.gate_proj.out_features == 0:
        return None
    if any(getattr(mlp, p).bias is not None for p in ("gate_proj", "up_proj", "down_proj")):
        raise ValueError(f"moe_ext.MoE.from_hf: {type(block).__name__}.{name} has biases; moe_ext's shared experts "
                         f"have none")
    _check_silu(f"{type(block).__name__}.{name}", mlp.act_fn, getattr(getattr(mlp, "config", None), "hidden_act", None))
    return mlp


def _model_router_dtype(weight):
    # The router matmul runs in the model dtype; moe_ext's default (float32, float64 for float64
    # inputs) already does that for float32/float64 models and follows later casts of the layer.
    return None if weight.dtype in (torch.float32, torch.float64) else weight.dtype


def _base(block, gate, softmax_renormalize):
    gate_up, down, expert_params = _experts(block)
    E, H = gate.weight.shape
    if gate_up.shape[0] != E or gate_up.shape[1] != H:
        raise ValueError(f"moe_ext.MoE.from_hf: {type(block).__name__} has a router for {E} experts of hidden {H} "
                         f"but experts of shape {tuple(gate_up.shape)}")
    kwargs = dict(hidden=H, ffn_hidden=down.shape[1], num_experts=E, k=int(gate.top_k),
                  score="softmax", renormalize=softmax_renormalize)
    return kwargs, gate_up, down, expert_params


def _mixtral(block):
    gate = block.gate
    kwargs, gate_up, down, params = _base(block, gate, True)  # Mixtral always renormalises the top-k
    kwargs["router_dtype"] = _model_router_dtype(gate.weight)
    return _Source(kwargs, gate.weight, gate_up, down, params, None, None, None,
                   float(getattr(block, "jitter_noise", 0.0) or 0.0), False)


def _qwen_moe(block, always_renormalize=False):
    gate = block.gate
    kwargs, gate_up, down, params = _base(block, gate, always_renormalize or bool(gate.norm_topk_prob))
    kwargs["router_dtype"] = _model_router_dtype(gate.weight)
    shared = _shared_mlp(block, "shared_expert")
    shared_gate = getattr(block, "shared_expert_gate", None) if shared is not None else None
    if shared_gate is not None and shared_gate.bias is not None:
        raise ValueError(f"moe_ext.MoE.from_hf: {type(block).__name__}.shared_expert_gate has a bias; moe_ext's "
                         "shared expert gate has none")
    if shared is not None:
        kwargs.update(shared_ffn_hidden=shared.gate_proj.out_features, shared_expert_gate=shared_gate is not None)
    return _Source(kwargs, gate.weight, gate_up, down, params, shared, shared_gate, None, 0.0, False)


def _deepseek_v3(block):
    gate = block.gate
    kwargs, gate_up, down, params = _base(block, gate, bool(gate.norm_topk_prob))
    E, k = kwargs["num_experts"], kwargs["k"]
    num_groups, topk_groups = int(gate.num_group), int(gate.topk_group)
    name = type(block).__name__
    if num_groups < 1 or E % num_groups != 0 or not 1 <= topk_groups <= num_groups:
        raise ValueError(f"moe_ext.MoE.from_hf: {name} has n_group={num_groups}, topk_group={topk_groups} "
                         f"for {E} experts")
    if k > topk_groups * (E // num_groups):
        raise ValueError(f"moe_ext.MoE.from_hf: {name} selects k={k} experts from only "
                         f"topk_group * experts per group = {topk_groups * (E // num_groups)}")
    limited = topk_groups < num_groups  # keeping every group is plain top-k
    shared = _shared_mlp(block, "shared_experts")
    kwargs.update(score="sigmoid", num_groups=num_groups if limited else None,
                  topk_groups=topk_groups if limited else None, expert_bias=True,
                  routed_scaling_factor=float(gate.routed_scaling_factor),
                  router_dtype=torch.float32,  # transformers runs this router in float32 for every model dtype
                  shared_ffn_hidden=shared.gate_proj.out_features if shared is not None else 0)
    return _Source(kwargs, gate.weight, gate_up, down, params, shared, None, gate.e_score_correction_bias, 0.0, True)


def _qwen_moe_renormalized(block):
    return _qwen_moe(block, always_renormalize=True)


# Class name -> reader. Blocks are matched by their exact class name (a subclass may change forward).
# The families beyond the first four are transformers' own copies of those blocks: their block,
# router and experts code is the same but for names (checked against transformers 5.23), except
# that the Qwen3.5-MoE and Qwen3-VL-MoE routers always renormalise (no norm_topk_prob), and some
# DeepSeek-V3 copies keep their selection bias in float32. tests/test_hf.py checks each one.
_READERS = {
    "MixtralSparseMoeBlock": _mixtral,
    "MiniMaxSparseMoeBlock": _mixtral,
    "Qwen2MoeSparseMoeBlock": _qwen_moe,
    "Qwen3NextSparseMoeBlock": _qwen_moe,
    "Qwen3_5MoeSparseMoeBlock": _qwen_moe_renormalized,
    "Qwen3MoeSparseMoeBlock": _qwen_moe,
    "Qwen3VLMoeTextSparseMoeBlock": _qwen_moe_renormalized,
    "OlmoeSparseMoeBlock": _qwen_moe,
    "FlexOlmoSparseMoeBlock": _qwen_moe,
    "MellumSparseMoeBlock": _qwen_moe,
    "DeepseekV3MoE": _deepseek_v3,
    "DeepseekV32MoE": _deepseek_v3,
    "Dots1MoE": _deepseek_v3,
    "Glm4MoeMoE": _deepseek_v3,
    "Glm4MoeLiteMoE": _deepseek_v3,
    "GlmMoeDsaMoE": _deepseek_v3,
    "KimiLinearMoE": _deepseek_v3,
    "BailingHybridMoE": _deepseek_v3,
    "SolarOpenMoE": _deepseek_v3,
}
SUPPORTED_BLOCKS = tuple(_READERS)


class _InputJitter:
    """Forward pre-hook: Mixtral's training-time jitter, x * U(1 - j, 1 + j) elementwise, fed to the
    router and the experts alike (the same random draw as transformers makes)."""

    def __init__(self, jitter):
        self.jitter = jitter

    def __call__(self, module, args):
        if not module.training or self.jitter <= 0:
            return None
        x = args[0]
        return (x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter),) + tuple(args[1:])

    def __repr__(self):
        return f"InputJitter({self.jitter})"


@torch.no_grad()
def _copy(dst, src, requires_grad):
    dst.copy_(src)
    dst.requires_grad_(requires_grad)


def moe_from_hf(block, ep_group=None, tp_group=None, placement=None, **overrides):
    """A moe_ext.MoE computing what the transformers MoE `block` computes, with copies of its weights.

    block: a MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock, Qwen3MoeSparseMoeBlock, DeepseekV3MoE or
    one of their copies in SUPPORTED_BLOCKS (transformers >= 5, fused experts). Every rank must pass the same block weights; each copies
    only what its layer holds:
      ep_group: the layer's expert-parallel group; rank r of W holds global experts
        [r * E / W, (r + 1) * E / W) by default.
      tp_group: expert tensor parallelism (EP x TP, groups from moe_ext.parallel.make_groups):
        each held expert keeps this TP rank's F / tp columns of the gate and of the up half of
        w1, and the same rows of w2.
      placement: which EP ranks hold which experts, replicas allowed (any form moe_ext.MoE takes:
        an ExpertLayout, a moe_ext.placement.Placement, a [W, E] bool array, a dict {expert:
        [ranks]}, per-rank expert lists); every replica is a copy of the block's expert. With
        replicas, building the layer is collective over ep_group (as the MoE constructor is).
    overrides: MoE keyword arguments that replace the ones read from the block (e.g.
    capacity_factor, pad_to, backend, router_dtype).
    The layer is created on the block's device in its dtype (expert_bias stays float32), in the
    block's train/eval mode, with requires_grad mirrored from the block's parameters. Mixtral's
    router_jitter_noise becomes a forward pre-hook (training only). The copies never alias the
    block's storage.
    """
    return _build(block, ep_group, tp_group, placement, overrides)[0]


def _build(block, ep_group, tp_group, placement, overrides):
    name = type(block).__name__
    reader = _READERS.get(name)
    if reader is None:
        raise TypeError(f"moe_ext.MoE.from_hf: unsupported block class {name!r} "
                        f"(supported: {', '.join(SUPPORTED_BLOCKS)})")
    src = reader(block)
    kwargs = dict(src.kwargs)
    kwargs.update(overrides)
    weight = src.router_weight
    kwargs.setdefault("device", weight.device)
    kwargs.setdefault("dtype", src.gate_up.dtype)
    hidden, ffn_hidden = kwargs.pop("hidden"), kwargs.pop("ffn_hidden")
    num_experts, k = kwargs.pop("num_experts"), kwargs.pop("k")
    layer = MoE(hidden, ffn_hidden, num_experts, k, ep_group, tp_group, placement=placement, **kwargs)

    gate_up_param, down_param = src.expert_params
    _copy(layer.router.weight, weight, weight.requires_grad)
    # This rank's slots (its experts, replicas included) and TP shard of the logical weights.
    layer.load_experts(src.gate_up, src.down)
    layer.w1.requires_grad_(gate_up_param.requires_grad)
    layer.w2.requires_grad_(down_param.requires_grad)
    if layer.shared is not None and src.shared is not None:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(src.shared, proj).weight
            _copy(getattr(layer.shared, proj).weight, w, w.requires_grad)
    if layer.shared_gate is not None and src.shared_gate is not None:
        _copy(layer.shared_gate.weight, src.shared_gate.weight, src.shared_gate.weight.requires_grad)
    if layer.expert_bias is not None and src.expert_bias is not None:
        with torch.no_grad():
            layer.expert_bias.copy_(src.expert_bias)
    if src.input_jitter > 0:
        layer.register_forward_pre_hook(_InputJitter(src.input_jitter))
    layer.train(block.training)
    return layer, src


# ---- swapping blocks inside a model ----------------------------------------------------------------

def _transformers_collector():
    """transformers' active output collector (a dict of lists) during a forward that records
    outputs, else None. Private to transformers: absent there means nothing is recorded."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    return _active_collector.get()


class _RecordRouterLogits:
    """Forward hook: appends the layer's router logits [T, E] to transformers' `router_logits`
    outputs (output_router_logits=True), as the replaced router module did, so the model's
    load-balancing loss still works after patching. Costs one extra router matmul, only then."""

    def __init__(self, fp32):
        self.fp32 = fp32

    def __call__(self, module, args, output):
        collected = _transformers_collector()
        if collected is None or "router_logits" not in collected:
            return
        x, w = args[0].reshape(-1, module.hidden), module.router.weight
        if self.fp32:
            x, w = x.float(), w.float()
        collected["router_logits"].append(F.linear(x, w))


class _WithRouterLogits(nn.Module):
    """For blocks whose forward returns (hidden, router_logits [T, E]) (older transformers)."""

    def __init__(self, moe, fp32):
        super().__init__()
        self.moe, self.fp32 = moe, fp32

    def forward(self, x):
        y = self.moe(x)
        x2, w = x.reshape(-1, self.moe.hidden), self.moe.router.weight
        if self.fp32:
            x2, w = x2.float(), w.float()
        return y, F.linear(x2, w)


@torch.no_grad()
def _returns_router_logits(block, hidden, num_experts):
    """Whether block(x) returns (hidden, router_logits) rather than a tensor: one probe token."""
    training = block.training
    block.eval()  # no jitter, no RNG draw
    try:
        p = block.gate.weight
        out = block(torch.zeros(1, 1, hidden, device=p.device, dtype=p.dtype))
    finally:
        block.train(training)
    if isinstance(out, torch.Tensor):
        return False
    if isinstance(out, (tuple, list)) and len(out) == 2 and out[1].shape[-1] == num_experts:
        return True
    raise TypeError(f"moe_ext.hf.patch_model: {type(block).__name__} returns {type(out).__name__}; expected a tensor "
                    f"or (hidden, router_logits)")


def patch_model(model, ep_group=None, tp_group=None, placement=None, **overrides):
    """Replaces, in place, every recognised MoE block of `model` by
    moe_ext.MoE.from_hf(block, ep_group, tp_group=tp_group, placement=placement, **overrides).

    The model's forward is unchanged: same outputs (within the dtype's rounding), and with
    output_router_logits=True the router logits are still recorded for transformers' aux loss.
    Under EP (and EP x TP, and with replicas) every rank of the groups patches the same model and
    keeps its own experts, TP shards and replicas; the model's forward then is a collective over
    the groups, and so is patching when `placement` has replicas. `placement` applies to every
    block; give a layer its own later with layer.apply_placement(...). Returns the number of
    blocks swapped.
    """
    found = [(name, module) for name, module in model.named_modules() if type(module).__name__ in _READERS]
    for name, block in found:
        layer, src = _build(block, ep_group, tp_group, placement, overrides)
        fp32 = src.router_logits_fp32
        if _returns_router_logits(block, layer.hidden, layer.num_experts):
            new = _WithRouterLogits(layer, fp32)
        else:
            layer.register_forward_hook(_RecordRouterLogits(fp32))
            new = layer
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not child:
            raise TypeError(f"moe_ext.hf.patch_model: the model itself is a {type(block).__name__}; "
                            f"use moe_ext.MoE.from_hf")
        setattr(parent, child, new)
    return len(found)
