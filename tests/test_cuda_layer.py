"""moe_ext.MoE on CUDA: the layer against the plain-torch reference (EP world 1, float32 and
bfloat16), the decode path captured in a CUDA graph and replayed with new inputs, and the chunked
pipeline over the ipc backend (two ranks sharing the one GPU).

Tolerances: float32 against the float64 reference within 1e-4 relative; bfloat16 forward within
2x the error of PyTorch running the same expert math in bfloat16 (same routing), and its
gradients within 2^-6 of the reference's scale. Replays of a captured graph run the same
kernels as the eager decode forward, so they must give the same bits.
"""
import pytest
import torch
import torch.distributed as dist

import moe_ext
import reference as ref
from dist_utils import run_world

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# NOTE: bf16/fp16 grouped kernels need K and N multiples of 8 (SwiGLU's 2F a multiple of 16).
H, F, E, K = 64, 32, 8, 2


def _layer(dtype, group=None, seed=0, **kw):
    torch.manual_seed(seed)  # the same weights on every rank
    layer = moe_ext.MoE(H, F, E, K, group, device="cuda", dtype=dtype, **kw)
    with torch.no_grad():
        layer.router.weight.normal_()
    return layer


def _torch_bf16_experts(x, router_w, w1, w2):
    """The reference's routing (float64), then the expert math as PyTorch does it in bfloat16."""
    r = ref.gating(x.double().cpu() @ router_w.double().cpu().t(), K)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for j in range(K):
        e = r["idx"][:, j].to(x.device)
        h = torch.bmm(x.unsqueeze(1), w1[e]).squeeze(1)
        h = torch.nn.functional.silu(h[:, :F]) * h[:, F:]
        y = torch.bmm(h.unsqueeze(1), w2[e]).squeeze(1)
        out += r["weights"][:, j, None].float().to(x.device) * y.float()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_matches_reference_cuda(dtype, seed):
    layer = _layer(dtype, seed=seed)
    x = torch.randn(200, H, device="cuda").to(dtype).requires_grad_(True)
    out = layer(x)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    params = [layer.router.weight, layer.w1, layer.w2]
    x64 = x.detach().double().cpu().requires_grad_(True)
    p64 = [p.detach().double().cpu().requires_grad_(True) for p in params]
    want = ref.moe_layer(x64, *p64, K)
    grads64 = torch.autograd.grad((want * g.double().cpu()).sum(), [x64] + p64)
    grads = [x.grad] + [p.grad for p in params]
    if dtype == torch.float32:
        torch.testing.assert_close(out.double().cpu(), want.detach(), rtol=1e-4, atol=1e-4)
        for got, w in zip(grads, grads64):
            torch.testing.assert_close(got.double().cpu(), w, rtol=1e-4, atol=1e-4)
        return
    with torch.no_grad():
        base = _torch_bf16_experts(x.detach(), layer.router.weight, layer.w1, layer.w2)
    err = (out.double().cpu() - want).abs().max().item()
    err_torch = (base.double().cpu() - want).abs().max().item()
    assert err <= 2 * err_torch + 1e-6, f"forward: our error {err:.3e} > 2 x PyTorch bf16's {err_torch:.3e}"
    names = ["x", "router", "w1", "w2"]
    for name, got, w in zip(names, grads, grads64):
        scale = w.abs().max().item()
        gerr = (got.double().cpu() - w).abs().max().item()
        assert gerr <= 2 ** -6 * scale + 1e-6, f"grad {name}: error {gerr:.3e} vs scale {scale:.3e}"


def _capture(layer, static_x):
    """The decode forward of `layer` on static_x captured in a CUDA graph (warmed up on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            layer(static_x, decode=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x, decode=True)
    return graph, static_out


def _replay_and_compare(layer, graph, static_x, static_out, inputs):
    for x in inputs:
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        got = static_out.clone()
        eager = layer(x, decode=True)
        assert torch.equal(got, eager), f"replay differs from the eager decode forward by " \
                                        f"{(got.float() - eager.float()).abs().max().item():.3g}"
        normal = layer(x)
        torch.testing.assert_close(got.float(), normal.float(), rtol=2 ** -7, atol=1e-3)


@torch.no_grad()
def test_decode_cuda_graph_world_of_one(seed):
    layer = _layer(torch.bfloat16, seed=seed, max_decode_tokens=16, shared_ffn_hidden=32).eval()
    static_x = torch.zeros(12, H, device="cuda", dtype=torch.bfloat16)
    graph, static_out = _capture(layer, static_x)
    static_stats = layer.stats  # NOTE: the graph's own tensors: every replay refreshes them
    inputs = [torch.randn(12, H, device="cuda").to(torch.bfloat16) for _ in range(3)]
    # A bare replay (no eager forward in between) updates the load counters in place.
    static_x.copy_(inputs[0])
    load, ema = layer.load.clone(), layer._load_ema.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert int(static_stats.tokens_per_expert.sum()) == 12 * K
    assert torch.equal(layer.load - load, static_stats.tokens_per_expert.to(load.device, load.dtype))
    assert not torch.equal(layer._load_ema, ema), "a replay must update the running load average"
    _replay_and_compare(layer, graph, static_x, static_out, inputs)


@torch.no_grad()
def test_decode_cuda_graph_routing_options(seed):
    """The decode forward captured with the routing options on (sigmoid, groups, expert bias,
    capacity, padding, scaling, a gated shared expert; float16, [B, S, H] input), replayed with
    new inputs; a changed expert_bias reroutes the replays (the graph reads the live buffer)."""
    layer = _layer(torch.float16, seed=seed, max_decode_tokens=16, score="sigmoid", num_groups=4, topk_groups=2,
                   expert_bias=True, capacity_factor=1.5, pad_to=8, routed_scaling_factor=2.0, shared_ffn_hidden=32,
                   shared_expert_gate=True).eval()
    static_x = torch.zeros(2, 6, H, device="cuda", dtype=torch.float16)
    graph, static_out = _capture(layer, static_x)
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(2, 6, H, generator=g).to("cuda", torch.float16) for _ in range(3)]
    _replay_and_compare(layer, graph, static_x, static_out, inputs)
    static_x.copy_(inputs[0])
    graph.replay()
    before = static_out.clone()
    layer.expert_bias.copy_(torch.linspace(-1, 1, E, device="cuda"))  # NOTE: sigmoid scores are in (0, 1)
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(static_out, before), "the replay ignored the new expert_bias"
    _replay_and_compare(layer, graph, static_x, static_out, inputs[:1])


@torch.no_grad()
def test_decode_capture_refuses_float32(seed):
    """float32 expert weights: the masked GEMM reads counts back to the host, so capturing the
    decode forward raises a ValueError that says so (not a failed capture)."""
    layer = _layer(torch.float32, seed=seed, max_decode_tokens=16).eval()
    static_x = torch.randn(5, H, device="cuda")
    eager = layer(static_x, decode=True)  # eager decode works in float32
    torch.testing.assert_close(eager, layer(static_x), rtol=1e-5, atol=1e-5)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        with torch.cuda.graph(graph):
            layer(static_x, decode=True)


def _graph_world(rank, world, seed):
    torch.cuda.set_device(0)  # NOTE: every rank on the one GPU (CUDA IPC works between processes on one GPU)
    with torch.no_grad():
        layer = _layer(torch.bfloat16, dist.group.WORLD, seed, max_decode_tokens=8).eval()
        T = 8 if rank == 0 else 3
        static_x = torch.zeros(T, H, device="cuda", dtype=torch.bfloat16)
        layer(static_x, decode=True)  # NOTE: creates the ipc communicator (a collective), outside any capture
        graph, static_out = _capture(layer, static_x)
        g = torch.Generator().manual_seed(seed + rank)
        inputs = [torch.randn(T, H, generator=g).to("cuda", torch.bfloat16) for _ in range(3)]
        _replay_and_compare(layer, graph, static_x, static_out, inputs)
    return True


def test_decode_cuda_graph_ipc_world_of_two(seed):
    assert all(run_world(_graph_world, 2, seed, seed=seed, timeout_s=150))


def _pipeline_world(rank, world, seed, partial_combine=False):
    torch.cuda.set_device(0)
    layer = _layer(torch.bfloat16, dist.group.WORLD, seed, partial_combine=partial_combine)
    T = (37, 0)[rank]
    g = torch.Generator().manual_seed(seed + rank)
    x = torch.randn(T, H, generator=g).to("cuda", torch.bfloat16)
    gout = torch.randn(T, H, generator=g).to("cuda", torch.bfloat16)
    results = {}
    comm = moe_ext.communicator(device=torch.device("cuda", 0))
    comm.num_sms = 0
    for n, overlap in ((1, True), (2, True), (3, False), (5, True)):
        layer.num_chunks, layer.overlap = n, overlap
        layer.comm_sms = 8 if n == 5 else 24
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        out = layer(xx)
        ((out * gout).sum() + 0.1 * layer.stats.aux_loss).backward()
        results[n] = [out.detach(), xx.grad] + [p.grad for p in layer.parameters()]
        assert comm.num_sms == 0, "the pipeline must restore the communicator's num_sms"
    for n in (2, 3, 5):
        for i, (a, b) in enumerate(zip(results[n], results[1])):
            assert torch.equal(a, b), f"rank {rank}, num_chunks={n}: result {i} differs"
    return True


@pytest.mark.parametrize("partial_combine", [False, True])
def test_chunked_pipeline_ipc_world_of_two(seed, partial_combine):
    assert all(run_world(_pipeline_world, 2, seed, partial_combine, seed=seed, timeout_s=150))
