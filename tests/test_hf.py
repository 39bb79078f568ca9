"""moe_ext.MoE.from_hf / moe_ext.hf.patch_model against the transformers blocks they replace.

Tiny random configs built here (no download); random weights and inputs are tie-free, so the
selections agree and only rounding differs.
"""
import pytest
import torch
import torch.distributed as dist
from torch import nn

transformers = pytest.importorskip("transformers")

import moe_ext  # noqa: E402
import moe_ext.hf  # noqa: E402

H, F_EXPERT, F_SHARED, E, K = 32, 16, 24, 8, 2
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5),
       # Mixtral/Qwen take the softmax, DeepSeek the router and sigmoid, in float32 even for float64
       # models, so their routing weights carry float32 rounding.
       torch.float64: dict(rtol=1e-5, atol=5e-6)}
BLOCK_CLASS = {"mixtral": "MixtralSparseMoeBlock", "qwen2": "Qwen2MoeSparseMoeBlock",
               "qwen3": "Qwen3MoeSparseMoeBlock", "deepseek": "DeepseekV3MoE"}
MODULE = {"mixtral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe", "deepseek": "deepseek_v3"}
MODEL_CLASS = {"mixtral": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM",
               "deepseek": "DeepseekV3ForCausalLM"}


def _config(kind, **kw):
    common = dict(vocab_size=64, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, num_experts_per_tok=K)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=F_EXPERT, num_local_experts=E, **common)
    elif kind == "qwen2":
        cfg = transformers.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=F_EXPERT, num_experts=E,
                                          shared_expert_intermediate_size=F_SHARED, norm_topk_prob=False, **common)
    elif kind == "qwen3":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=F_EXPERT, num_experts=E,
                                          head_dim=8, norm_topk_prob=True, **common)
    else:
        common["num_key_value_heads"] = 4
        cfg = transformers.DeepseekV3Config(intermediate_size=48, moe_intermediate_size=F_EXPERT, n_routed_experts=E,
                                            n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                            norm_topk_prob=True, first_k_dense_replace=1, q_lora_rank=16,
                                            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                            **common)
    for key, value in kw.items():
        setattr(cfg, key, value)
    cfg._attn_implementation = "eager"
    return cfg


def _hf_class(kind, which):
    import importlib

    module = importlib.import_module(f"transformers.models.{MODULE[kind]}.modeling_{MODULE[kind]}")
    return getattr(module, which)


@torch.no_grad()
def _randomize(module):
    """Every parameter ~ N(0, 1/fan_in) (fan_in = last dim), DeepSeek's selection bias ~ N(0, 0.1)."""
    for p in module.parameters():
        p.normal_(0.0, p.shape[-1] ** -0.5 if p.dim() > 1 else 1.0)
    for name, b in module.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0.0, 0.1)
    return module


def _block(kind, dtype=torch.float32, **cfg):
    config = _config(kind, **cfg)
    config._experts_implementation = "eager"  # a standalone block: transformers' loop over experts
    return _randomize(_hf_class(kind, BLOCK_CLASS[kind])(config).to(dtype))


CASES = [("mixtral", {}), ("qwen2", {}), ("qwen2", dict(norm_topk_prob=True)), ("qwen3", {}),
         ("qwen3", dict(norm_topk_prob=False)), ("deepseek", {}),
         ("deepseek", dict(norm_topk_prob=False, n_group=1, topk_group=1, routed_scaling_factor=1.0))]


def _check_against_block(block, layer, x, tol, group=None):
    """Forward, and backward w.r.t. the input, router and expert weights, of layer vs block.
    Under EP (group) an expert's gradient sums the tokens of every rank: the block's, all-reduced."""
    x_hf, x_me = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf, y = block(x_hf), layer(x_me)
    torch.testing.assert_close(y, y_hf, **tol)
    g = torch.randn_like(y)
    experts = block.experts
    wrt_hf = [x_hf, block.gate.weight, experts.gate_up_proj, experts.down_proj]
    grads_hf = torch.autograd.grad((y_hf * g).sum(), wrt_hf)
    if group is not None:
        for grad in grads_hf[2:]:
            dist.all_reduce(grad, group=group)
    grads = torch.autograd.grad((y * g).sum(), [x_me, layer.router.weight, layer.w1, layer.w2])
    lo, n = layer.first_local_expert, layer.num_local_experts
    expected = [grads_hf[0], grads_hf[1],
                grads_hf[2][lo:lo + n].transpose(1, 2), grads_hf[3][lo:lo + n].transpose(1, 2)]
    for name, a, b in zip(("x", "router", "w1", "w2"), grads, expected):
        # The router's gradient sums every token's float32-rounded softmax/sigmoid Jacobian in the
        # block, so it only meets float32 tolerances, whatever the model dtype.
        t = TOL[torch.float32] if name == "router" else tol
        torch.testing.assert_close(a, b, **t, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind,cfg", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_block_equivalence(seed, kind, cfg, dtype):
    block = _block(kind, dtype, **cfg)
    layer = moe_ext.MoE.from_hf(block)
    assert isinstance(layer, moe_ext.MoE) and layer.num_experts == E and layer.k == K
    assert layer.w1.dtype == dtype and layer.router.weight.dtype == dtype
    assert (layer.shared is not None) == (kind in ("qwen2", "deepseek"))
    assert (layer.shared_gate is not None) == (kind == "qwen2")
    assert (layer.expert_bias is not None) == (kind == "deepseek")
    _check_against_block(block, layer, torch.randn(2, 9, H, dtype=dtype), TOL[dtype])
    assert layer.stats.tokens_per_expert.sum().item() == 2 * 9 * K


# transformers' copies of the four families: (model module, block class, config class, family,
# whether the router always renormalises, config overrides).
COPIES = [
    ("minimax", "MiniMaxSparseMoeBlock", "MiniMaxConfig", "mixtral", True, {}),
    ("qwen3_next", "Qwen3NextSparseMoeBlock", "Qwen3NextConfig", "qwen2", False, {}),
    ("qwen3_5_moe", "Qwen3_5MoeSparseMoeBlock", "Qwen3_5MoeTextConfig", "qwen2", True, {}),
    ("olmoe", "OlmoeSparseMoeBlock", "OlmoeConfig", "qwen3", False, dict(intermediate_size=F_EXPERT)),
    ("flex_olmo", "FlexOlmoSparseMoeBlock", "FlexOlmoConfig", "qwen3", False, dict(intermediate_size=F_EXPERT)),
    ("mellum", "MellumSparseMoeBlock", "MellumConfig", "qwen3", False, {}),
    ("qwen3_vl_moe", "Qwen3VLMoeTextSparseMoeBlock", "Qwen3VLMoeTextConfig", "qwen3", True, {}),
    ("deepseek_v32", "DeepseekV32MoE", "DeepseekV32Config", "deepseek", False, {}),
    ("dots1", "Dots1MoE", "Dots1Config", "deepseek", False, {}),
    ("glm4_moe", "Glm4MoeMoE", "Glm4MoeConfig", "deepseek", False, {}),
    ("glm4_moe_lite", "Glm4MoeLiteMoE", "Glm4MoeLiteConfig", "deepseek", False, {}),
    ("glm_moe_dsa", "GlmMoeDsaMoE", "GlmMoeDsaConfig", "deepseek", False, {}),
    ("kimi_linear", "KimiLinearMoE", "KimiLinearConfig", "deepseek", False, {}),
    ("bailing_hybrid", "BailingHybridMoE", "BailingHybridConfig", "deepseek", False, {}),
    ("solar_open", "SolarOpenMoE", "SolarOpenConfig", "deepseek", False, {}),
]


def _copy_block(module, block_name, config_name, norm_topk_prob, dtype=torch.float32, **overrides):
    """A tiny block of a copied family: the config class's defaults with the MoE sizes set (every
    name the families use for them; unused ones are harmless)."""
    import importlib

    try:
        mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        cfg_mod = importlib.import_module(f"transformers.models.{module}.configuration_{module}")
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} has no {module}")
    config = getattr(cfg_mod, config_name)()
    sizes = dict(hidden_size=H, intermediate_size=48, moe_intermediate_size=F_EXPERT, num_experts_per_tok=K,
                 shared_expert_intermediate_size=F_SHARED, n_shared_experts=1, n_group=4, topk_group=2,
                 routed_scaling_factor=2.5, norm_topk_prob=norm_topk_prob, hidden_act="silu", router_jitter_noise=0.0)
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        sizes[name] = E
    sizes.update(overrides)
    for key, value in sizes.items():
        setattr(config, key, value)
    config._experts_implementation = "eager"
    return _randomize(getattr(mod, block_name)(config).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
@pytest.mark.parametrize("module,block_name,config_name,family,always,overrides", COPIES,
                         ids=[c[0] for c in COPIES])
def test_copied_families_equivalence(seed, module, block_name, config_name, family, always, overrides, norm, dtype):
    if always and not norm:
        pytest.skip("this router always renormalises")
    block = _copy_block(module, block_name, config_name, norm, dtype, **overrides)
    layer = moe_ext.MoE.from_hf(block)
    assert layer.num_experts == E and layer.k == K and layer.routing["renormalize"] == norm
    assert (layer.expert_bias is not None) == (family == "deepseek")
    assert layer.routing["score"] == ("sigmoid" if family == "deepseek" else "softmax")
    if family == "deepseek":
        assert layer.routing["num_groups"] == 4 and layer.routing["topk_groups"] == 2
    assert (layer.shared is not None) == (family in ("qwen2", "deepseek"))
    _check_against_block(block, layer, torch.randn(2, 9, H, dtype=dtype), TOL[dtype])


def test_weight_mapping_copies(seed):
    block = _block("deepseek")
    layer = moe_ext.MoE.from_hf(block)
    ex = block.experts
    torch.testing.assert_close(layer.w1[..., :F_EXPERT], ex.gate_up_proj[:, :F_EXPERT].transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(layer.w1[..., F_EXPERT:], ex.gate_up_proj[:, F_EXPERT:].transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(layer.w2, ex.down_proj.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(layer.expert_bias, block.gate.e_score_correction_bias, rtol=0, atol=0)
    assert layer.expert_bias.dtype == torch.float32 and layer.routed_scaling_factor == 2.5
    assert layer.routing["num_groups"] == 4 and layer.routing["topk_groups"] == 2
    # Copies, not aliases: changing the block leaves the layer as it was.
    before = [t.detach().clone() for t in (layer.router.weight, layer.w1, layer.w2, layer.shared.up_proj.weight,
                                            layer.expert_bias)]
    with torch.no_grad():
        for t in (block.gate.weight, ex.gate_up_proj, ex.down_proj, block.shared_experts.up_proj.weight,
                  block.gate.e_score_correction_bias):
            t.add_(1.0)
    after = (layer.router.weight, layer.w1, layer.w2, layer.shared.up_proj.weight, layer.expert_bias)
    for a, b in zip(after, before):
        assert torch.equal(a, b)


def test_mode_requires_grad_and_overrides(seed):
    block = _block("qwen2").eval()
    block.experts.down_proj.requires_grad_(False)
    layer = moe_ext.MoE.from_hf(block, capacity_factor=4.0, router_dtype=torch.float64)
    assert not layer.training and not layer.w2.requires_grad and layer.w1.requires_grad
    assert layer.routing["capacity_factor"] == 4.0 and layer.router_dtype == torch.float64


def test_bfloat16_within_rounding(seed):
    block = _block("mixtral", torch.bfloat16)
    layer = moe_ext.MoE.from_hf(block)
    assert layer.router_dtype == torch.bfloat16 and layer.w1.dtype == torch.bfloat16
    x = torch.randn(2, 9, H, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), block(x.clone()), rtol=2e-2, atol=2e-2)


def test_mixtral_jitter_in_training(seed):
    block = _block("mixtral", router_jitter_noise=0.2).train()
    layer = moe_ext.MoE.from_hf(block)
    x = torch.randn(2, 9, H)
    torch.manual_seed(seed)
    y_hf = block(x.clone())
    torch.manual_seed(seed)
    y = layer(x)
    torch.testing.assert_close(y, y_hf, **TOL[torch.float32])
    assert not torch.allclose(y, layer.eval()(x))  # the jitter really is applied in training only


def test_unsupported_blocks_raise():
    with pytest.raises(TypeError, match="Qwen2MoeMLP"):
        moe_ext.MoE.from_hf(_hf_class("qwen2", "Qwen2MoeMLP")(_config("qwen2")))
    with pytest.raises(TypeError, match="Linear"):
        moe_ext.MoE.from_hf(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="gelu"):
        moe_ext.MoE.from_hf(_block("qwen3", hidden_act="gelu"))


def _model(kind, dtype=torch.float32):
    torch.manual_seed(0)
    config = _config(kind)
    if dtype == torch.float64:
        config._experts_implementation = "eager"  # transformers' default grouped_mm has no float64
    model = _hf_class(kind, MODEL_CLASS[kind])(config).to(dtype).eval()
    for module in model.modules():  # non-trivial routing
        if type(module).__name__ in moe_ext.hf.SUPPORTED_BLOCKS:
            _randomize(module)
    return model


@pytest.mark.parametrize("kind", ["mixtral", "qwen2", "deepseek"])
def test_patch_model_logits_and_aux_loss(seed, kind):
    model = _model(kind)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        before = model(ids, labels=ids, output_router_logits=True)
        num_blocks = sum(type(m).__name__ == BLOCK_CLASS[kind] for m in model.modules())
        assert moe_ext.hf.patch_model(model) == num_blocks > 0
        assert not any(type(m).__name__ == BLOCK_CLASS[kind] for m in model.modules())
        assert sum(isinstance(m, moe_ext.MoE) for m in model.modules()) == num_blocks
        after = model(ids, labels=ids, output_router_logits=True)
        plain = model(ids)
    tol = TOL[torch.float32]
    torch.testing.assert_close(after.logits, before.logits, **tol)
    torch.testing.assert_close(plain.logits, before.logits, **tol)
    torch.testing.assert_close(after.loss, before.loss, **tol)
    # The router logits are still recorded (transformers' load-balancing loss needs them).
    assert len(after.router_logits) == len(before.router_logits) == num_blocks
    for a, b in zip(after.router_logits, before.router_logits):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    if before.aux_loss is not None:
        torch.testing.assert_close(after.aux_loss, before.aux_loss, **tol)


@pytest.mark.parametrize("which", ["olmoe", "glm4_moe"])
def test_patch_model_of_copied_families(seed, which):
    """Whole tiny models of two copied families: logits, loss, router logits and aux loss."""
    common = dict(vocab_size=64, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, num_experts_per_tok=K, eos_token_id=None)
    if which == "olmoe":
        config, model_class = transformers.OlmoeConfig(intermediate_size=F_EXPERT, num_experts=E, **common), \
            transformers.OlmoeForCausalLM
    else:
        config = transformers.Glm4MoeConfig(intermediate_size=48, moe_intermediate_size=F_EXPERT, n_routed_experts=E,
                                            n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1,
                                            head_dim=8, **common)
        model_class = transformers.Glm4MoeForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_class(config).eval()
    for module in model.modules():
        if type(module).__name__ in moe_ext.hf.SUPPORTED_BLOCKS:
            _randomize(module)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        before = model(ids, labels=ids, output_router_logits=True)
        assert moe_ext.hf.patch_model(model) == (2 if which == "olmoe" else 1)
        after = model(ids, labels=ids, output_router_logits=True)
    tol = TOL[torch.float32]
    torch.testing.assert_close(after.logits, before.logits, **tol)
    torch.testing.assert_close(after.loss, before.loss, **tol)
    if which == "olmoe":  # OLMoE adds transformers' load-balancing loss from the recorded router logits
        torch.testing.assert_close(after.aux_loss, before.aux_loss, **tol)


def _tuple_forward(self, hidden_states):
    b, s, h = hidden_states.shape
    x = hidden_states.view(-1, h)
    router_logits, weights, idx = self.gate(x)
    return self.experts(x, idx, weights).view(b, s, h), router_logits


def test_patch_model_keeps_tuple_outputs(seed):
    base = _hf_class("mixtral", BLOCK_CLASS["mixtral"])
    tuple_block = type(base.__name__, (base,), {"forward": _tuple_forward})  # as older transformers returned

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = _randomize(tuple_block(_config("mixtral")))

        def forward(self, x):
            h, logits = self.mlp(x)
            return h, logits

    model = Parent()
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        y0, l0 = model(x)
        assert moe_ext.hf.patch_model(model) == 1
        y1, l1 = model(x)
    assert isinstance(model.mlp.moe, moe_ext.MoE)
    torch.testing.assert_close(y1, y0, **TOL[torch.float32])
    torch.testing.assert_close(l1, l0, **TOL[torch.float32])


# ---- expert parallel, gloo world 2 ----------------------------------------------------------

EP_CASES = [("mixtral", "float32"), ("qwen2", "float64"), ("deepseek", "float64")]


def _ep_rank(rank, world, cases):
    counts = []
    for kind, dtype_name in cases:
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(1234)  # the same block on every rank
        block = _block(kind, dtype)
        layer = moe_ext.MoE.from_hf(block, ep_group=dist.group.WORLD)
        n = E // world
        assert layer.num_local_experts == n and layer.first_local_expert == rank * n
        assert torch.equal(layer.w2, block.experts.down_proj[rank * n:(rank + 1) * n].transpose(1, 2))
        torch.manual_seed(100 + rank)  # different tokens, and a different count, on each rank
        x = torch.randn(1, 7 + 3 * rank, H, dtype=dtype)
        _check_against_block(block, layer, x, TOL[dtype], dist.group.WORLD)
        counts.append(int(layer.stats.tokens_per_expert.sum()))
    # A whole model patched on every rank: each rank's logits as before (the forward is collective).
    model = _model("mixtral")
    ids = torch.randint(0, 64, (1, 6 + rank))
    with torch.no_grad():
        before = model(ids).logits
        assert moe_ext.hf.patch_model(model, ep_group=dist.group.WORLD) == 2
        torch.testing.assert_close(model(ids).logits, before, **TOL[torch.float32])
    return counts


def test_expert_parallel_world2():
    """Each rank builds its layer from the same seeded block; every rank's output (and input,
    router, expert gradients) equals the block's; a patched Mixtral model's logits are unchanged
    on every rank. One spawned world for all of it."""
    from dist_utils import run_world

    counts = run_world(_ep_rank, 2, EP_CASES, seed=0, timeout_s=120)
    assert counts == [[7 * K] * len(EP_CASES), [10 * K] * len(EP_CASES)]


def _generate(model, ids, new_tokens=6):
    # NOTE: no end-of-sequence stop: under EP every rank must make the same number of forward calls
    # (each is a collective), so generation must not stop early on one rank.
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)


def test_generate_after_patching(seed):
    """Greedy generation (prefill, then one token per forward with the KV cache) picks the same
    tokens after patch_model."""
    model = _model("mixtral")
    ids = torch.randint(1, 64, (2, 5))
    before = _generate(model, ids)
    assert moe_ext.hf.patch_model(model) == 2
    assert torch.equal(_generate(model, ids), before)


def _generate_rank(rank, world):
    model = _model("mixtral")  # the same weights on every rank
    ids = torch.randint(1, 64, (1, 4 + 3 * rank), generator=torch.Generator().manual_seed(rank))
    before = _generate(model, ids)
    assert moe_ext.hf.patch_model(model, ep_group=dist.group.WORLD) == 2
    after = _generate(model, ids)  # every decode step is a dispatch/combine between the ranks
    assert torch.equal(after, before), (after, before)
    return after.shape[1]


def test_generate_expert_parallel_world2():
    from dist_utils import run_world

    assert run_world(_generate_rank, 2, seed=0, timeout_s=120) == [4 + 6, 7 + 6]


# ---- hybrid layouts, gloo world 4: EP2 x TP2 and EP4 with replicated experts -------------------------

# Experts 0 and 5 get a second copy (on ranks 1 and 3); every rank holds three slots, some empty.
REPLICAS = [[0, 1], [2, 3, 0], [4, 5], [6, 7, 5]]


def _hybrid_rank(rank, world, dtype_names):
    from moe_ext.parallel import make_groups

    ep_group, tp_group = make_groups(2, 2)  # TP innermost: TP groups {0, 1}, {2, 3}; EP {0, 2}, {1, 3}
    layouts = [("EP2xTP2", dict(ep_group=ep_group, tp_group=tp_group)),
               ("EP4 + replicas", dict(ep_group=dist.group.WORLD, placement=REPLICAS))]
    second_replica_rows = 0
    for dtype_name in dtype_names:
        dtype = getattr(torch, dtype_name)
        for what, kwargs in layouts:
            model = _model("mixtral", dtype)  # the same weights on every rank
            blocks = [m for m in model.modules() if type(m).__name__ == BLOCK_CLASS["mixtral"]]
            gen = torch.Generator().manual_seed(100 + rank)  # different tokens, and counts, on each rank
            ids = torch.randint(0, 64, (1, 16 + 2 * rank), generator=gen)
            with torch.no_grad():
                before = model(ids).logits
                assert moe_ext.hf.patch_model(model, **kwargs) == len(blocks) == 2
                layers = [m for m in model.modules() if isinstance(m, moe_ext.MoE)]
                after = model(ids).logits  # collective over the groups
            torch.testing.assert_close(after, before, **TOL[dtype], msg=lambda m, w=what, d=dtype_name: f"{w} {d}: {m}")
            for block, layer in zip(blocks, layers):
                gate_up = block.experts.gate_up_proj.detach().transpose(1, 2)  # [E, H, 2F]
                down = block.experts.down_proj.detach().transpose(1, 2)  # [E, F, H]
                assert layer.w1.dtype == dtype and layer.w1.requires_grad and layer.w2.requires_grad
                same = moe_ext.MoE.from_hf(block, **kwargs)  # the class method's path: the same slots and shards
                assert torch.equal(same.w1, layer.w1) and torch.equal(same.w2, layer.w2), what
                if "tp_group" in kwargs:
                    assert (layer.ep_world, layer.tp_world) == (2, 2) and layer.tp_rank == rank % 2
                    assert tuple(layer.w1.shape) == (E // 2, H, F_EXPERT) and tuple(layer.w2.shape) == (
                        E // 2, F_EXPERT // 2, H)
                    w1, w2 = layer.expert_weights()  # every EP slot and TP shard, reassembled
                    assert torch.equal(w1, gate_up) and torch.equal(w2, down), what
                else:  # slots hold their experts in ascending order, empty ones (-1) last
                    assert layer.local_experts == sorted(REPLICAS[rank]) + [-1] * (3 - len(REPLICAS[rank]))
                    assert layer.replica_counts.tolist() == [2, 1, 1, 1, 1, 2, 1, 1]
                    for s, e in enumerate(layer.local_experts):  # every copy, bit for bit
                        want1, want2 = (gate_up[e], down[e]) if e >= 0 else (0 * gate_up[0], 0 * down[0])
                        assert torch.equal(layer.w1[s], want1) and torch.equal(layer.w2[s], want2), (what, s, e)
                    second = {1: 0, 3: 5}.get(rank)  # ranks 1 and 3 hold the second copies of experts 0, 5
                    if second is not None:
                        second_replica_rows += int(layer.tokens_per_slot[layer.layout.slot_of(rank, second)])
    return second_replica_rows


def test_patch_model_hybrid_layouts_world4():
    """A tiny Mixtral model patched on 4 gloo ranks as EP2 x TP2 (each expert's w1 / w2 split over
    a TP pair) and as EP4 with two experts replicated: every rank's logits equal the unpatched
    model's, in float32 and float64, and the layers hold exactly the block's weights (the TP shards
    reassembled by expert_weights, each replica a bit-exact copy). One spawned world for all of it."""
    from dist_utils import run_world

    rows = run_world(_hybrid_rank, 4, ["float32", "float64"], seed=0, timeout_s=240)
    assert rows[0] == rows[2] == 0 and rows[1] + rows[3] > 0  # the replicas really served tokens
