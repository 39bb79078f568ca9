"""Hybrid layouts of moe_ext.MoE on CUDA, in bfloat16: EP2 x TP2, and EP4 with two hot experts
replicated, against EP4 alone and the float64 reference (tests/test_parallel.py checks the same
layouts exactly in float64 on the CPU).

Four spawned ranks share the one GPU (run under MPS: GPU.md); dispatch/combine take the ipc
backend (auto), the TP all-gather / reduce-scatter and the replica gradient sums go through the
gloo group with CUDA tensors. The budget per output: 2x the error of plain torch doing the same
expert math in bfloat16, plus one bfloat16 rounding of the result (TP rounds each partial output
before the float32 sum).
"""
import pytest
import torch
import torch.distributed as dist

import moe_ext
import reference as ref
from dist_utils import run_world
from moe_ext.parallel import make_groups

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# bf16 grouped GEMMs need K and N multiples of 8: the TP shard of F (16) included.
H, F, K, E = 64, 32, 2, 8
BF = torch.bfloat16


def _problem(seed, world, hot=()):
    g = torch.Generator().manual_seed(seed)
    router = torch.randn(E, H, generator=g, dtype=torch.float64) / H ** 0.5
    lean = torch.ones(H, dtype=torch.float64) / H ** 0.5
    for e in hot:
        router[e] += 2 * lean
    p = dict(router=router, w1=torch.randn(E, H, 2 * F, generator=g, dtype=torch.float64) / 8,
             w2=torch.randn(E, F, H, generator=g, dtype=torch.float64) / 6)
    p = {n: t.to(BF) for n, t in p.items()}  # the layers and the references start from the same bits
    tokens = [37, 0, 64, 19][:world]  # one rank with none
    p["xs"] = [torch.randn(t, H, generator=g).to(BF) for t in tokens]
    p["gs"] = [torch.randn(t, H, generator=g) for t in tokens]
    return p


def _truth(p, dtype):
    """moe_layer over every rank's tokens in `dtype`: (out, grad x) as float64 on the CPU."""
    x = torch.cat(p["xs"]).to(dtype).requires_grad_()
    out = ref.moe_layer(x, *(p[n].to(dtype) for n in ("router", "w1", "w2")), K)
    (out.float() * torch.cat(p["gs"]).float()).sum().backward()
    return out.detach().double(), x.grad.double()


def _run(p, rank, ep_group, tp_group=None, placement=None, **kw):
    dev = torch.device("cuda", torch.cuda.current_device())
    layer = moe_ext.MoE(H, F, E, K, ep_group, tp_group=tp_group, placement=placement, device=dev, dtype=BF, **kw)
    with torch.no_grad():
        layer.router.weight.copy_(p["router"])
    layer.load_experts(p["w1"].to(dev), p["w2"].to(dev))
    x = p["xs"][rank].to(dev).clone().requires_grad_()  # NOTE: a fresh leaf per run (also on a CPU dry run)
    out = layer(x)
    (out.float() * p["gs"][rank].to(dev)).sum().backward()
    layer.sync_replica_grads()
    return out.detach().double().cpu(), x.grad.double().cpu(), layer


def _rows(p, rank):
    start = sum(x.shape[0] for x in p["xs"][:rank])
    return slice(start, start + p["xs"][rank].shape[0])


def _check(what, ours, rows, truth, torch_own, baseline=None):
    """ours: this rank's rows of the result; truth / torch_own: every rank's (the budget is the same
    on every rank, and defined on a rank without tokens)."""
    budget = 2 * (torch_own - truth).abs().max().item() + 2 ** -8 * truth.abs().max().item()
    truth = truth[rows]
    err = (ours - truth).abs().max().item() if ours.numel() else 0.0
    assert err <= budget, f"{what}: error {err:.3g} against float64 > budget {budget:.3g}"
    if baseline is not None and ours.numel():  # and close to EP alone, within the same budget twice
        diff = (ours - baseline).abs().max().item()
        assert diff <= 2 * budget, f"{what}: differs from EP alone by {diff:.3g} > {2 * budget:.3g}"


def _hybrid(rank, world, seed):
    torch.cuda.set_device(0)
    out = {}
    for name, hot in (("tp", ()), ("replicas", (0, 1))):
        p = _problem(seed, world, hot)
        (o64, g64), (obf, gbf) = _truth(p, torch.float64), _truth(p, BF)
        rows = _rows(p, rank)
        base_out, base_gx, _ = _run(p, rank, dist.group.WORLD)
        _check(f"EP4 {name} problem: out", base_out, rows, o64, obf)
        _check(f"EP4 {name} problem: grad x", base_gx, rows, g64, gbf)
        if name == "tp":
            ep_group, tp_group = make_groups(2, 2)
            o, gx, layer = _run(p, rank, ep_group, tp_group)
            assert layer.w1.shape == (E // 2, H, F) and layer.w2.shape == (E // 2, F // 2, H)
            label = "EP2xTP2"
            # The other token path: one dispatch over the 4 ranks to every shard (k * tp slots per token).
            od, gxd, _ = _run(p, rank, ep_group, tp_group, tp_dispatch="direct")
            _check("EP2xTP2 direct: out", od, rows, o64, obf, base_out)
            _check("EP2xTP2 direct: grad x", gxd, rows, g64, gbf, base_gx)
        else:
            placement = [[0, 1, 2], [0, 3, 4], [1, 5, 6], [7]]  # the hot experts 0 and 1 twice each
            o, gx, layer = _run(p, rank, dist.group.WORLD, placement=placement)
            label = "EP4 replicated"
            # The copies of a replicated expert got the same (summed) gradient.
            g = layer.w1.grad.float()
            copies = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(copies, g.contiguous())
            slot = {r: {e: s for s, e in enumerate(row)} for r, row in enumerate(placement)}
            for e, (a, b) in ((0, (0, 1)), (1, (0, 2))):
                assert torch.equal(copies[a][slot[a][e]], copies[b][slot[b][e]]), f"replica grads of {e} differ"
        _check(f"{label}: out", o, rows, o64, obf, base_out)
        _check(f"{label}: grad x", gx, rows, g64, gbf, base_gx)
        out[name] = True
    dist.barrier()
    return out


def test_hybrid_layouts_bfloat16_match_ep(seed):
    results = run_world(_hybrid, 4, seed, seed=seed, timeout_s=200)
    assert all(r == {"tp": True, "replicas": True} for r in results)


def test_route_to_replicas_cuda_matches_cpu(seed):
    # The one-block kernel (<= 2048 slots) and the tensor-op path above it: the CPU op's slots; the
    # small call captured in a CUDA graph and replayed with new routing.
    from moe_ext.parallel import ExpertLayout, route_to_replicas
    ranks, per_rank = 4, 5
    E = ranks * per_rank - 2
    layout = ExpertLayout.build([[(r * per_rank + j) % E for j in range(per_rank)] for r in range(ranks)], E, ranks)
    counts, slots = layout.replica_counts.cuda(), layout.replica_slots.cuda()
    for T, k in ((0, 2), (1, 1), (256, 8), (2048, 1), (4096, 4)):
        for dtype in (torch.int32, torch.int64):
            idx = torch.randint(-1, E, (T, k), dtype=dtype)
            for rank in range(ranks):
                want = route_to_replicas(idx, layout.replica_counts, layout.replica_slots, rank)
                got = route_to_replicas(idx.cuda(), counts, slots, rank)
                assert got.dtype == dtype and torch.equal(got.cpu(), want), (T, k, rank)
    idx = torch.randint(-1, E, (128, 8)).cuda()
    route_to_replicas(idx, counts, slots, 1)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = route_to_replicas(idx, counts, slots, 1)
    idx.copy_(torch.randint(-1, E, (128, 8)))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), route_to_replicas(idx.cpu(), layout.replica_counts, layout.replica_slots, 1))
