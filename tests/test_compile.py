"""torch.compile(fullgraph=True) over the whole single-rank MoE pipeline, forward and backward."""
import pytest
import torch

import moe_ext
import reference as ref


def moe_forward(x, router_w, w1, w2, k, num_experts):
    logits = x @ router_w
    weights, idx, stats = moe_ext.topk_gating(logits, k, capacity_factor=2.0)
    x_perm, row_map, tokens_per_expert = moe_ext.permute(x, idx, num_experts, pad_to=4)
    h = moe_ext.grouped_gemm(x_perm, w1, tokens_per_expert, activation="swiglu")
    y = moe_ext.grouped_gemm(h, w2, tokens_per_expert)
    return moe_ext.unpermute(y, row_map, weights.to(y.dtype)), stats.aux_loss


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_pipeline(seed, backend):
    torch._dynamo.reset()
    T, H, F, E, k = 48, 16, 12, 6, 2
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    router_w = torch.randn(H, E, dtype=torch.float64, requires_grad=True)
    w1 = (torch.randn(E, H, 2 * F, dtype=torch.float64) / 4).requires_grad_()
    w2 = (torch.randn(E, F, H, dtype=torch.float64) / 4).requires_grad_()
    compiled = torch.compile(moe_forward, fullgraph=True, backend=backend, dynamic=False)
    out, aux = compiled(x, router_w, w1, w2, k, E)
    eager_out, eager_aux = moe_forward(x, router_w, w1, w2, k, E)
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(aux, eager_aux)

    # Gradients through the compiled graph equal eager autograd.
    params = (x, router_w, w1, w2)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum() + aux, params)
    eager_grads = torch.autograd.grad((eager_out * g).sum() + eager_aux, params)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)

    # And the forward equals the float64 reference built from reference.py.
    r = ref.gating(x.detach() @ router_w.detach(), k, capacity_factor=2.0)
    xp, rm, sizes = ref.permute(x.detach(), r["idx"], E, 4)
    y = ref.grouped_gemm(ref.grouped_gemm(xp, w1.detach(), sizes, activation="swiglu"), w2.detach(), sizes)
    torch.testing.assert_close(out.detach(), ref.unpermute(y, rm, r["weights"]))


def test_compile_noisy_gating_dynamic_shapes():
    """Noisy top-k traces at symbolic sizes (torch.randn with generator=None did not)."""
    torch._dynamo.reset()

    def route(logits):
        w, idx, st = moe_ext.topk_gating(logits, 2, noise_std=0.5)
        return w, idx, st.noise

    compiled = torch.compile(route, fullgraph=True, backend="aot_eager", dynamic=True)
    for T in (6, 9, 1):
        w, idx, noise = compiled(torch.randn(T, 8))
        assert w.shape == idx.shape == (T, 2) and noise.shape == (T, 8)
