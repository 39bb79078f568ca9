"""Bad inputs raise a clear error that names the argument, never a crash or a wrong answer."""
import pytest
import torch

import moe_ext

ERRORS = (RuntimeError, ValueError, TypeError)
L = torch.randn(6, 8)
X = torch.randn(6, 16)
IDX = torch.randint(0, 8, (6, 2), dtype=torch.int32)
A = torch.randn(10, 4)
B = torch.randn(3, 4, 6)
C = torch.tensor([3, 3, 4])


def _row_map():
    return moe_ext.permute(X, IDX, 8)[1]


CASES = {
    # topk_gating
    "logits 1-D": (lambda: moe_ext.topk_gating(torch.randn(8), 2), "logits must be 2-D"),
    "logits int": (lambda: moe_ext.topk_gating(torch.ones(4, 8, dtype=torch.int32), 2), "logits must be float"),
    "k > E": (lambda: moe_ext.topk_gating(L, 9), r"k must be in \[1, num_experts=8\]"),
    "k = 0": (lambda: moe_ext.topk_gating(L, 0), "k must be in"),
    "k not int": (lambda: moe_ext.topk_gating(L, 2.0), "k must be an int"),
    "bad score": (lambda: moe_ext.topk_gating(L, 2, score="relu"), "score must be 'softmax' or 'sigmoid'"),
    "bias shape": (lambda: moe_ext.topk_gating(L, 2, expert_bias=torch.zeros(7)), "expert_bias must have shape"),
    "bias dtype": (lambda: moe_ext.topk_gating(L, 2, expert_bias=torch.zeros(8, dtype=torch.int64)),
                   "expert_bias must be float32"),
    "groups not divisor": (lambda: moe_ext.topk_gating(L, 2, num_groups=3, topk_groups=1), "num_groups must be"),
    "topk_groups > groups": (lambda: moe_ext.topk_gating(L, 2, num_groups=4, topk_groups=5), "topk_groups must be"),
    "groups alone": (lambda: moe_ext.topk_gating(L, 2, num_groups=4), "num_groups and topk_groups"),
    "k > group budget": (lambda: moe_ext.topk_gating(L, 3, num_groups=4, topk_groups=1), "exceeds the experts allowed"),
    "capacity_factor <= 0": (lambda: moe_ext.topk_gating(L, 2, capacity_factor=-1.0), "capacity_factor"),
    "noise shape": (lambda: moe_ext.topk_gating(L, 2, noise=torch.zeros(6, 7)), "noise must have the shape"),
    "noise_std < 0": (lambda: moe_ext.topk_gating(L, 2, noise_std=-0.1), "noise_std"),
    "seq_len not divisor": (lambda: moe_ext.topk_gating(L, 2, seq_len=4), "seq_len=4"),
    "logits device": (lambda: torch.ops.moe_ext.topk_gating(L, 2, "softmax", True, torch.zeros(8, device="meta"), 0,
                                                           0, 0.0, None, 0), "expert_bias must be on the same device"),
    # permute
    "idx out of range": (lambda: moe_ext.permute(X, torch.tensor([[8, 0]] * 6), 8), r"idx holds expert 8"),
    "idx below -1": (lambda: moe_ext.permute(X, torch.tensor([[-2, 0]] * 6), 8), r"idx holds expert -2"),
    "idx rows": (lambda: moe_ext.permute(X, IDX[:5], 8), "idx has 5 rows but x has 6"),
    "idx float": (lambda: moe_ext.permute(X, IDX.float(), 8), "idx must be int32 or int64"),
    "idx 1-D": (lambda: moe_ext.permute(X, IDX[:, 0], 8), "idx must be 2-D"),
    "x 3-D": (lambda: moe_ext.permute(X[None], IDX, 8), "x must be 2-D"),
    "x last dim strided": (lambda: moe_ext.permute(X[:, ::2], IDX, 8), "x must have a contiguous last dimension"),
    "pad_to 0": (lambda: moe_ext.permute(X, IDX, 8, pad_to=0), "pad_to must be >= 1"),
    "capacity < 0": (lambda: moe_ext.permute(X, IDX, 8, capacity=-3), "capacity must be"),
    "num_experts 0": (lambda: moe_ext.permute(X, IDX, 0), "num_experts must be >= 1"),
    "x/idx devices": (lambda: moe_ext.permute(X, IDX.to("meta"), 8), "idx must be on the same device as x"),
    "max_rows 0": (lambda: moe_ext.permute(X, IDX, 8, max_rows=0), "max_rows must be None or >= 1"),
    "max_rows with pad_to": (lambda: moe_ext.permute(X, IDX, 8, pad_to=4, max_rows=6), "pad_to"),
    "max_rows overflow": (lambda: torch.ops.moe_ext.permute(X, IDX, 8, 1, -1, True, 2 ** 62), "overflows int64"),
    "pad_to huge": (lambda: moe_ext.permute(X, IDX, 8, pad_to=2 ** 62), r"num_tokens \* k \+ pad_to - 1 must be < 2\^31"),
    "pad_to huge, no sync": (lambda: moe_ext.permute(X, IDX, 8, pad_to=2 ** 31 - 11, sync=False),
                             r"num_tokens \* k = 12 and pad_to = 2147483637"),
    # route_to_replicas
    "replica rank huge": (lambda: torch.ops.moe_ext.route_to_replicas(IDX, torch.ones(8, dtype=torch.long),
                                                                      torch.arange(8).view(8, 1), 2 ** 63 - 1),
                          r"rank must be in \[0, 2\^31\)"),
    # the layer's load statistics
    "load dtype": (lambda: torch.ops.moe_ext.accumulate_load_(torch.zeros(8), torch.zeros(9, dtype=torch.float64),
                                                              torch.zeros(8, dtype=torch.int32), 0.9),
                   "load must be a contiguous int64"),
    "load_ema size": (lambda: torch.ops.moe_ext.accumulate_load_(torch.zeros(8, dtype=torch.int64),
                                                                 torch.zeros(8, dtype=torch.float64),
                                                                 torch.zeros(8, dtype=torch.int32), 0.9),
                      r"load_ema must be a contiguous float64 \[E \+ 1 = 9\]"),
    "load counts dtype": (lambda: torch.ops.moe_ext.accumulate_load_(torch.zeros(8, dtype=torch.int64),
                                                                     torch.zeros(9, dtype=torch.float64),
                                                                     torch.zeros(8, dtype=torch.int64), 0.9),
                          "tokens_per_expert must be an int32"),
    "load decay": (lambda: torch.ops.moe_ext.accumulate_load_(torch.zeros(8, dtype=torch.int64),
                                                              torch.zeros(9, dtype=torch.float64),
                                                              torch.zeros(8, dtype=torch.int32), 1.5),
                   r"decay must be in \[0, 1\]"),
    # unpermute
    "row_map int32": (lambda: moe_ext.unpermute(X, _row_map().int()), "row_map must be int64"),
    "row_map out of range": (lambda: moe_ext.unpermute(X[:3], _row_map()), r"row_map holds row"),
    "weights shape": (lambda: moe_ext.unpermute(torch.randn(12, 16), _row_map(), torch.rand(6, 3)),
                      "weights must have the shape of row_map"),
    "weights dtype": (lambda: moe_ext.unpermute(torch.randn(12, 16), _row_map(), torch.rand(6, 2).half()),
                      "weights must be float32 or the dtype of y_perm"),
    "y_perm int": (lambda: moe_ext.unpermute(torch.ones(12, 16, dtype=torch.int32), _row_map()),
                   "y_perm must be a float tensor"),
    "row_map repeats a row (backward)": (
        lambda: torch.ops.moe_ext.unpermute_backward(torch.randn(2, 16), torch.randn(2, 16),
                                                     torch.tensor([[0, 0], [1, 0]]), None),
        r"row_map uses row 0 twice \(again at token 0, slot 1\)"),
    # grouped_gemm
    "b dtype": (lambda: moe_ext.grouped_gemm(A, B.double(), C), "b must have the dtype of a"),
    "K mismatch": (lambda: moe_ext.grouped_gemm(A, torch.randn(3, 5, 6), C), r"the K of b \(5"),
    "b 2-D": (lambda: moe_ext.grouped_gemm(A, B[0], C), "b must be 3-D"),
    "negative count": (lambda: moe_ext.grouped_gemm(A, B, torch.tensor([12, -2, 0])), r"tokens_per_expert\[1\] is negative"),
    "counts exceed rows": (lambda: moe_ext.grouped_gemm(A, B, torch.tensor([5, 5, 5])), "sums to 15 rows but a has only 10"),
    "counts overflow int64": (lambda: moe_ext.grouped_gemm(A, B, torch.tensor([2 ** 62] * 3)), "sums past int64"),
    "activation unhashable": (lambda: moe_ext.grouped_gemm(A, B, C, activation=["swiglu"]),
                              "activation must be None or 'swiglu'"),
    "counts length": (lambda: moe_ext.grouped_gemm(A, B, torch.tensor([5, 5])), "must have E=3 counts or E\\+1=4 offsets"),
    "offsets start": (lambda: moe_ext.grouped_gemm(A, B, torch.tensor([1, 3, 6, 10])), "must start at 0"),
    "offsets decrease": (lambda: moe_ext.grouped_gemm(A, B, torch.tensor([0, 6, 3, 10])), "non-decreasing"),
    "counts float": (lambda: moe_ext.grouped_gemm(A, B, C.float()), "tokens_per_expert must be int32 or int64"),
    "a strided": (lambda: moe_ext.grouped_gemm(torch.randn(10, 8)[:, ::2], B, C), "a must be contiguous"),
    "b strided": (lambda: moe_ext.grouped_gemm(A, torch.randn(3, 6, 4).transpose(1, 2), C), "b must be contiguous"),
    "swiglu odd N": (lambda: moe_ext.grouped_gemm(A, torch.randn(3, 4, 5), C, activation="swiglu"), "even N"),
    "bad activation": (lambda: moe_ext.grouped_gemm(A, B, C, activation="gelu"), "activation must be None or 'swiglu'"),
    "a int": (lambda: moe_ext.grouped_gemm(A.long(), B.long(), C), "a must be float32"),
    # dispatch / combine
    "bad backend": (lambda: moe_ext.dispatch(X, IDX, torch.rand(6, 2), 8, backend="mpi"), "backend must be one of"),
    "dispatch pad_to huge": (lambda: moe_ext.dispatch(X, IDX, torch.rand(6, 2), 8, pad_to=2 ** 40),
                             r"pad_to must be in \[1, 65536\]"),
    "combine handle": (lambda: moe_ext.combine(X, object()), "handle"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_clear_error(name):
    fn, pattern = CASES[name]
    with pytest.raises(ERRORS, match=pattern):
        fn()


def test_enough_cases():
    assert len(CASES) >= 20


def _double_backward_cases():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 8, dtype=torch.float64, generator=g)
    a, b = torch.randn(5, 4, dtype=torch.float64, generator=g), torch.randn(2, 4, 6, dtype=torch.float64, generator=g)
    y, w = torch.randn(6, 16, dtype=torch.float64, generator=g), torch.rand(3, 2, dtype=torch.float64, generator=g)
    rm = torch.tensor([[0, 1], [2, -1], [4, 5]])
    am = torch.randn(2, 3, 4, dtype=torch.float64, generator=g)
    logits = torch.randn(6, 8, dtype=torch.float64, generator=g)
    return {
        "swiglu": ((h,), lambda h: moe_ext.gemm.swiglu(h)),
        "grouped_gemm": ((a, b), lambda a, b: moe_ext.grouped_gemm(a, b, torch.tensor([2, 3]), activation="swiglu")),
        "grouped_gemm_masked": ((am, b), lambda a, b: moe_ext.grouped_gemm_masked(a, b, torch.tensor([3, 1]))),
        "unpermute": ((y, w), lambda y, w: moe_ext.unpermute(y, rm, w)),
        "topk_gating": ((logits,), lambda x: moe_ext.topk_gating(x, 2)[0]),
    }


@pytest.mark.parametrize("name", list(_double_backward_cases()))
def test_double_backward_raises_not_zeros(name):
    """A gradient of a gradient through these ops is an error naming the op (it was silently zero,
    or an unrelated error from an out= kernel); the first-order gradients under create_graph=True
    equal the plain ones."""
    inputs, fn = _double_backward_cases()[name]
    xs = [t.clone().requires_grad_() for t in inputs]
    want = torch.autograd.grad(fn(*xs).pow(2).sum(), xs)
    xs = [t.clone().requires_grad_() for t in inputs]
    got = torch.autograd.grad(fn(*xs).pow(2).sum(), xs, create_graph=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=f"moe_ext.{name}: double backward"):
        torch.autograd.grad(sum(g.sum() for g in got), xs, allow_unused=True, materialize_grads=True)
