"""permute / unpermute (CPU) against the float64 reference in reference.py."""
import pytest
import torch
from torch.autograd import gradcheck

import moe_ext
import reference as ref


def _routing(T, k, E, drop=0.1, skew=False):
    if skew:
        idx = torch.full((T, k), E - 1, dtype=torch.int32)
        idx[:, 1:] = torch.randint(0, E, (T, k - 1), dtype=torch.int32) if k > 1 else idx[:, 1:]
    else:
        idx = torch.randint(0, E, (T, k), dtype=torch.int32)
    idx[torch.rand(T, k) < drop] = -1
    return idx


CASES = [
    # T, H, k, E, pad_to, capacity, skew
    (0, 8, 2, 4, 1, None, False),
    (1, 8, 1, 1, 1, None, False),
    (3, 40, 2, 8, 16, None, False),
    (37, 8, 8, 5, 4, None, False),
    (64, 24, 2, 8, 1, 3, False),
    (64, 24, 2, 8, 8, 0, False),
    (101, 16, 4, 8, 16, 10, True),
    (257, 8, 2, 256, 1, None, False),
]


@pytest.mark.parametrize("T,H,k,E,pad_to,capacity,skew", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_permute_matches_reference(seed, T, H, k, E, pad_to, capacity, skew, dtype):
    x = torch.randn(T, H).to(dtype)
    idx = _routing(T, k, E, skew=skew)
    x_perm, row_map, tpe = moe_ext.permute(x, idx, E, pad_to=pad_to, capacity=capacity)
    r_perm, r_map, r_tpe = ref.permute(x, idx, E, pad_to, capacity)
    assert torch.equal(row_map, r_map) and row_map.dtype == torch.int64
    assert torch.equal(tpe, r_tpe) and tpe.dtype == torch.int32
    assert x_perm.dtype == dtype and torch.equal(x_perm, r_perm)
    if skew:
        assert tpe[E - 1] >= min(T, capacity or T)


@pytest.mark.parametrize("pad_to,capacity", [(1, None), (8, None), (4, 5)])
def test_permute_worst_case_size(seed, pad_to, capacity):
    T, H, k, E = 50, 8, 2, 6
    x, idx = torch.randn(T, H), _routing(T, k, E)
    exact = moe_ext.permute(x, idx, E, pad_to=pad_to, capacity=capacity, sync=True)
    padded = moe_ext.permute(x, idx, E, pad_to=pad_to, capacity=capacity, sync=False)
    n = T * k if capacity is None else min(T * k, capacity * E)
    assert padded[0].shape[0] == n + min(n, E) * (pad_to - 1)
    total = int(exact[2].sum())
    assert exact[0].shape[0] == total
    assert torch.equal(padded[0][:total], exact[0]) and (padded[0][total:] == 0).all()
    assert torch.equal(padded[1], exact[1]) and torch.equal(padded[2], exact[2])


@pytest.mark.parametrize("capacity", [2 ** 40, 2 ** 61, 2 ** 62, 2 ** 63 - 1])
def test_permute_huge_capacity_never_binds(seed, capacity):
    """capacity * num_experts overflows int64 here: the worst-case size must not wrap (it did: a
    segfault, or a negative size)."""
    T, H, k, E = 9, 8, 2, 4
    x, idx = torch.randn(T, H), _routing(T, k, E)
    for sync in (True, False):
        want = moe_ext.permute(x, idx, E, sync=sync)
        got = moe_ext.permute(x, idx, E, capacity=capacity, sync=sync)
        assert got[0].shape == want[0].shape
        assert sync or got[0].shape == (T * k, H)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


MASKED_CASES = [
    # T, H, k, E, max_rows, capacity, skew
    (0, 8, 2, 4, 3, None, False),
    (1, 8, 1, 1, 1, None, False),
    (37, 8, 8, 5, 64, None, False),  # room for every slot
    (64, 24, 2, 8, 5, None, False),  # max_rows drops
    (64, 24, 2, 8, 7, 3, False),  # capacity below max_rows
    (64, 24, 2, 8, 2, 6, True),  # max_rows below capacity
    (101, 16, 4, 8, 101, None, True),  # one expert gets every token
]


@pytest.mark.parametrize("T,H,k,E,max_rows,capacity,skew", MASKED_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_permute_masked_layout_matches_reference(seed, T, H, k, E, max_rows, capacity, skew, dtype):
    x = torch.randn(T, H).to(dtype)
    idx = _routing(T, k, E, skew=skew)
    x_perm, row_map, valid = moe_ext.permute(x, idx, E, capacity=capacity, max_rows=max_rows)
    r_perm, r_map, r_valid = ref.permute_masked(x, idx, E, max_rows, capacity)
    assert x_perm.shape == (E, max_rows, H) and x_perm.dtype == dtype
    assert torch.equal(row_map, r_map) and torch.equal(valid, r_valid) and valid.dtype == torch.int32
    assert torch.equal(x_perm, r_perm)
    # The same rows as the contiguous layout with that capacity, each expert's segment moved.
    cap = max_rows if capacity is None else min(capacity, max_rows)
    flat, flat_map, tpe = moe_ext.permute(x, idx, E, capacity=cap)
    assert torch.equal(valid, tpe)
    starts = torch.cumsum(tpe.long(), 0) - tpe.long()
    for e in range(E):
        assert torch.equal(x_perm[e, :int(tpe[e])], flat[int(starts[e]):int(starts[e] + tpe[e])])
    # Back through unpermute: the same sums as from the contiguous layout.
    w = torch.rand(T, k, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(moe_ext.unpermute(x_perm.view(-1, H), row_map, w), moe_ext.unpermute(flat, flat_map, w))


def test_permute_masked_gradcheck_scales_and_errors(seed):
    T, H, k, E, max_rows = 9, 5, 2, 3, 4
    idx = _routing(T, k, E, drop=0.2, skew=True)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x_: moe_ext.permute(x_, idx, E, max_rows=max_rows)[0], (x,))
    scale = torch.rand(T, 3) + 0.5
    x_perm, row_map, valid, s_perm = moe_ext.permute(x.detach(), idx, E, max_rows=max_rows, x_scale=scale)
    assert s_perm.shape == (E * max_rows, 3)
    for t in range(T):
        for j in range(k):
            r = int(row_map[t, j])
            if r >= 0:
                assert torch.equal(s_perm[r], scale[t]) and torch.equal(x_perm.view(-1, H)[r], x[t].detach())
    empty = torch.ones(E * max_rows, dtype=torch.bool)
    empty[row_map[row_map >= 0]] = False
    assert (s_perm[empty] == 0).all() and (x_perm.view(-1, H)[empty] == 0).all()
    with pytest.raises(ValueError, match="max_rows"):
        moe_ext.permute(x, idx, E, max_rows=0)
    with pytest.raises(ValueError, match="pad_to"):
        moe_ext.permute(x, idx, E, pad_to=2, max_rows=4)
    with pytest.raises(RuntimeError, match="pad_to"):
        torch.ops.moe_ext.permute(x, idx, E, 2, -1, True, 4)
    with pytest.raises(RuntimeError, match="outside"):
        bad = idx.clone()
        bad[0, 0] = E
        moe_ext.permute(x, bad, E, max_rows=max_rows)


def test_permute_moves_bytes_of_any_dtype(seed):
    idx = _routing(20, 2, 4)
    for dtype in [torch.int8, torch.int64] + ([torch.float8_e4m3fn] if hasattr(torch, "float8_e4m3fn") else []):
        x = torch.randint(-100, 100, (20, 16)).to(dtype)
        x_perm, _, _ = moe_ext.permute(x, idx, 4)
        assert torch.equal(x_perm.view(torch.uint8), ref.permute(x.view(torch.uint8), idx, 4)[0])


def test_permute_strided_rows(seed):
    x = torch.randn(30, 64)[:, :16]  # row stride 64
    idx = _routing(30, 2, 4)
    assert torch.equal(moe_ext.permute(x, idx, 4)[0], ref.permute(x, idx, 4)[0])


@pytest.mark.parametrize("with_weights", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_unpermute_matches_reference(seed, with_weights, dtype):
    T, H, k, E = 77, 24, 4, 8
    idx = _routing(T, k, E)
    _, row_map, tpe = moe_ext.permute(torch.randn(T, H), idx, E, pad_to=4, capacity=30)
    y = torch.randn(int(tpe.sum()), H).to(dtype)
    w = torch.rand(T, k) if with_weights else None
    out = moe_ext.unpermute(y, row_map, w)
    expect = ref.unpermute(y, row_map, w)
    assert out.dtype == dtype
    # fp32 accumulation: the only error beyond float64 is the final rounding to dtype + fp32 sums.
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), expect, rtol=tol, atol=tol)


def test_unpermute_is_exact_fp32_sum_in_slot_order(seed):
    """Bit-level contract shared with the CUDA kernel: acc = acc + w*y in float32, j = 0..k-1."""
    T, H, k, E = 33, 8, 3, 4
    idx = _routing(T, k, E, drop=0.2)
    _, row_map, tpe = moe_ext.permute(torch.randn(T, H), idx, E)
    y = torch.randn(int(tpe.sum()), H).to(torch.bfloat16)
    w = torch.rand(T, k)
    acc = torch.zeros(T, H, dtype=torch.float32)
    for j in range(k):
        r = row_map[:, j]
        ok = r >= 0
        acc[ok] = acc[ok] + w[ok, j, None] * y[r[ok]].float()
    assert torch.equal(moe_ext.unpermute(y, row_map, w), acc.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_rows_convert_like_torch(dtype):
    """The CPU ops convert 16-bit rows on the bits (vectorised): every bit pattern widens exactly,
    and float32 sums round to nearest even like torch's own conversion, subnormals, overflow to
    infinity and ties included; NaN stays NaN."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    y = bits.view(dtype).reshape(-1, 8)  # every pattern once
    R = y.shape[0]
    row_map = torch.arange(R).unsqueeze(1)
    out = moe_ext.unpermute(y, row_map)  # 0.0 + y in float32, narrowed back: y (-0.0 becomes +0.0)
    want = (torch.zeros(R, 8) + y.float()).to(dtype)
    nan = y.isnan()
    assert torch.equal(out.isnan(), nan)
    # A NaN comes back as c10's scalar conversion gives it: 0x7E00 with its sign (float16), 0x7FC0
    # (bfloat16), whichever instructions convert (F16C or not).
    y16 = y.view(torch.int16)[nan].int() & 0xFFFF
    canon = (y16 & 0x8000) | 0x7E00 if dtype == torch.float16 else torch.full_like(y16, 0x7FC0)
    assert torch.equal(out.view(torch.int16)[nan].int() & 0xFFFF, canon)
    assert torch.equal(out.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    assert torch.equal(out.view(torch.int16)[~nan & (y != 0)], y.view(torch.int16)[~nan & (y != 0)])
    # Sums of two rows: round-to-nearest-even of an exact float32 sum (most patterns, every exponent).
    perm = torch.randperm(R)
    a, b = y, y[perm]
    got = moe_ext.unpermute(torch.cat([a, b]), torch.stack([torch.arange(R), R + torch.arange(R)], 1))
    want = (a.float() + b.float()).to(dtype)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    # Weighted: float32 products and sums of random scale, rounded once.
    w = torch.rand(R, 2) * 3
    got = moe_ext.unpermute(torch.cat([a, b]), torch.stack([torch.arange(R), R + torch.arange(R)], 1), w)
    want = (torch.zeros(R, 8) + w[:, :1] * a.float() + w[:, 1:] * b.float()).to(dtype)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


def test_roundtrip_identity(seed):
    T, H, k, E = 40, 16, 2, 8
    x = torch.randn(T, H, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int()
    x_perm, row_map, _ = moe_ext.permute(x, idx, E, pad_to=8)
    torch.testing.assert_close(moe_ext.unpermute(x_perm, row_map, torch.full((T, k), 1.0 / k, dtype=torch.float64)), x)


@pytest.mark.parametrize("pad_to,capacity", [(1, None), (4, 3)])
def test_gradcheck(seed, pad_to, capacity):
    T, H, k, E = 9, 5, 2, 3
    idx = _routing(T, k, E, drop=0.2)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x_: moe_ext.permute(x_, idx, E, pad_to=pad_to, capacity=capacity)[0], (x,))
    _, row_map, tpe = moe_ext.permute(x.detach(), idx, E, pad_to=pad_to, capacity=capacity)
    y = torch.randn(int(tpe.sum()), H, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda y_, w_: moe_ext.unpermute(y_, row_map, w_), (y, w))
    assert gradcheck(lambda y_: moe_ext.unpermute(y_, row_map), (y,))


def test_float32_weights_with_float64_rows_get_gradients(seed):
    T, H, k, E = 10, 4, 2, 3
    idx = _routing(T, k, E, drop=0.0)
    _, row_map, tpe = moe_ext.permute(torch.randn(T, H), idx, E)
    y = torch.randn(int(tpe.sum()), H, dtype=torch.float64)
    w = torch.rand(T, k, requires_grad=True)
    g = torch.randn(T, H, dtype=torch.float64)
    (moe_ext.unpermute(y, row_map, w) * g).sum().backward()
    expect = torch.stack([(y[row_map[:, j]] * g).sum(-1) for j in range(k)], 1)
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad.double(), expect, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 in this torch")
def test_fp8_rows_with_scales_travel_together(seed):
    T, H, k, E = 45, 32, 2, 6
    x = (torch.randn(T, H) * 4).to(torch.float8_e4m3fn)
    scale = torch.rand(T, 2) + 0.5
    idx = _routing(T, k, E)
    x_perm, row_map, tpe, s_perm = moe_ext.permute(x, idx, E, pad_to=4, capacity=9, x_scale=scale)
    assert s_perm.dtype == torch.float32 and s_perm.shape == (x_perm.shape[0], 2)
    for t in range(T):
        for j in range(k):
            r = int(row_map[t, j])
            if r >= 0:
                assert torch.equal(x_perm[r].view(torch.uint8), x[t].view(torch.uint8))
                assert torch.equal(s_perm[r], scale[t])
    used = torch.zeros(x_perm.shape[0], dtype=torch.bool)
    used[row_map[row_map >= 0]] = True
    assert (s_perm[~used] == 0).all()
    with pytest.raises(ValueError, match="x_scale must be"):
        moe_ext.permute(x, idx, E, x_scale=scale[:-1])
