"""torch.library.opcheck on every op: schema, fake/Meta kernels, autograd registration, AOT dispatch."""
import pytest
import torch

import moe_ext  # noqa: F401

ops = torch.ops.moe_ext


def _gating_samples():
    torch.manual_seed(0)
    out = []
    for dtype, rg in [(torch.float32, False), (torch.float64, True), (torch.bfloat16, False)]:
        logits = torch.randn(12, 8, dtype=dtype, requires_grad=rg)
        out.append((logits, 2, "softmax", True, None, 0, 0, 0.0, None, 0))
        out.append((logits, 3, "sigmoid", False, torch.randn(8), 4, 2, 1.0, torch.randn(12, 8), 6))
    out.append((torch.randn(0, 8), 2, "softmax", True, None, 0, 0, 1.0, None, 0))
    return out


def _permute_samples():
    torch.manual_seed(0)
    idx = torch.randint(-1, 6, (10, 2), dtype=torch.int32)
    x = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    return [(x, idx, 6, 1, -1, True), (x, idx, 6, 4, 2, True), (x, idx, 6, 4, -1, False),
            (torch.randn(0, 8), idx[:0], 6, 1, -1, True), (x, idx, 6, 1, -1, True, 3), (x, idx, 6, 1, 2, False, 5),
            (torch.randn(0, 8), idx[:0], 6, 1, -1, False, 2)]


def _unpermute_samples():
    torch.manual_seed(0)
    idx = torch.randint(-1, 6, (10, 2), dtype=torch.int32)
    _, row_map, tpe = ops.permute(torch.randn(10, 16), idx, 6, 2, -1, True)
    R = int(tpe.sum())
    y = torch.randn(R, 16, dtype=torch.float64, requires_grad=True)
    w = torch.rand(10, 2, dtype=torch.float64, requires_grad=True)
    return [(y, row_map, w), (y, row_map, None), (torch.randn(R, 16).bfloat16(), row_map, torch.rand(10, 2))]


def _gemm_samples():
    torch.manual_seed(0)
    a = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 8, 6, dtype=torch.float64, requires_grad=True)
    bt = torch.randn(3, 6, 8, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([7, 0, 13])
    bias = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(20, dtype=torch.float64, requires_grad=True)
    return [(a, b, counts, False, "none"), (a, bt, counts, True, "swiglu"),
            (a, b, torch.tensor([0, 7, 7, 20], dtype=torch.int32), False, "swiglu"),
            (torch.randn(20, 8).bfloat16(), torch.randn(3, 8, 6).bfloat16(), counts, False, "none"),
            (a, b, counts, False, "swiglu", bias, scale), (a, bt, counts, True, "none", bias, None),
            (a, b, counts, False, "none", None, torch.rand(20))]


SAMPLES = {
    "topk_gating": _gating_samples,
    "permute": _permute_samples,
    "unpermute": _unpermute_samples,
    "grouped_gemm": _gemm_samples,
}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_opcheck(name):
    for args in SAMPLES[name]():
        torch.library.opcheck(getattr(ops, name).default, args)


def test_opcheck_backward_ops():
    torch.manual_seed(0)
    logits = torch.randn(12, 8)
    w, idx, *_ = ops.topk_gating(logits, 2, "softmax", True, None, 0, 0, 1.0, None, 0)
    z = torch.zeros(())
    torch.library.opcheck(ops.topk_gating_backward.default,
                          (torch.randn_like(w), z + 1, z, z + 0.5, logits, None, idx, "softmax", True, None, 0, 0, 0))
    y, row_map, w2 = _unpermute_samples()[0]
    torch.library.opcheck(ops.unpermute_backward.default, (torch.randn(10, 16, dtype=torch.float64), y.detach(),
                                                           row_map, w2.detach()))
    from moe_ext.parallel import ExpertLayout
    layout = ExpertLayout.build([[0, 1, 2], [0, 3, 4]], 5, 2)
    for idx in (torch.randint(-1, 5, (7, 2), dtype=torch.int32), torch.randint(-1, 5, (0, 3))):
        torch.library.opcheck(ops.route_to_replicas.default, (idx, layout.replica_counts, layout.replica_slots, 1))
    torch.library.opcheck(ops.accumulate_load_.default, (torch.randint(0, 9, (6,)), torch.rand(7, dtype=torch.float64),
                                                        torch.randint(0, 9, (6,), dtype=torch.int32), 0.9))
    torch.library.opcheck(ops.grouped_gemm_wgrad.default,
                          (torch.randn(20, 8), torch.randn(20, 6), torch.tensor([7, 0, 13]), 3, True))
