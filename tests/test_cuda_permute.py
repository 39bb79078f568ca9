"""CUDA permute / unpermute / unpermute_backward against the CPU ops (the reference semantics).

Integer outputs and every row that is only moved or summed in the CPU op's order are compared
bit for bit (x_perm, row_map, tokens_per_expert, unpermute's output, grad_y). The weights'
gradient is a reduction whose order differs (CPU: float64 in column order; CUDA: float64 per
lane, then across a warp), so it is compared with a tolerance.
Outputs are allocated by the ops, so "poisoned" outputs are poisoned through the caching
allocator: blocks of the outputs' sizes are filled with a pattern and freed just before the call.
"""
import pytest
import torch

import moe_ext

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ops = torch.ops.moe_ext
FP8 = getattr(torch, "float8_e4m3fn", None)
ROW_DTYPES = [torch.bfloat16, torch.float16, torch.float32] + ([FP8] if FP8 is not None else [])
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# ---- helpers ---------------------------------------------------------------------------------------

def _routing(T, k, E, drop=0.1, distinct=False, dtype=torch.int32):
    """idx [T, k] on the CPU: expert ids in [0, E), a fraction `drop` set to -1 (not routed)."""
    if distinct and k <= E:
        idx = torch.rand(T, E).argsort(dim=1)[:, :k]
    else:
        idx = torch.randint(0, E, (T, k))
    idx[torch.rand(T, k) < drop] = -1
    return idx.to(dtype)


def _rows(T, H, dtype, device="cpu"):
    """Random rows of any dtype; fp8 goes through float32 (all its bytes stay meaningful)."""
    x = torch.randn(T, H, device=device)
    return x.to(dtype)


def _poison(nbytes, byte):
    """Fills blocks of these sizes with `byte` and frees them, so the next allocations of the same
    sizes (the op's outputs) start from that pattern rather than from zeros."""
    bufs = [torch.full((max(int(n), 1),), byte, dtype=torch.uint8, device="cuda") for n in nbytes for _ in range(2)]
    torch.cuda.synchronize()
    del bufs


def _nbytes(*tensors):
    return [t.numel() * t.element_size() for t in tensors]


def _assert_bits(got, want, what):
    got = got.detach().cpu()
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g = got.contiguous().view(torch.uint8) if got.dim() else got
    w = want.contiguous().view(torch.uint8) if want.dim() else want
    if not torch.equal(g, w):
        bad = (g != w).nonzero()
        raise AssertionError(f"{what}: {bad.shape[0]} bytes differ, first at {bad[0].tolist()}")


def _check_permute(x, idx, E, pad_to, capacity, modes=(True, False)):
    """permute on CUDA == permute on CPU, bit for bit, in exact and no-sync mode."""
    cap = -1 if capacity is None else capacity
    x_cpu, idx_cpu = x.cpu(), idx.cpu()
    for exact in modes:
        ref = ops.permute(x_cpu, idx_cpu, E, pad_to, cap, exact)
        _poison(_nbytes(*ref), 0xA5 if exact else 0xFF)  # 0xFF: NaN rows; 0xA5: negative ids
        got = ops.permute(x, idx, E, pad_to, cap, exact)
        tag = f"exact={exact} T={x.shape[0]} H={x.shape[1]} k={idx.shape[1]} E={E} pad_to={pad_to} cap={capacity}"
        assert got[0].device == x.device and got[1].device == x.device
        _assert_bits(got[1], ref[1], "row_map " + tag)
        _assert_bits(got[2], ref[2], "tokens_per_expert " + tag)
        _assert_bits(got[0], ref[0], f"x_perm {x.dtype} " + tag)
    return got


def _capacity_cases(T, k, E):
    return [None, max(1, (T * k) // (2 * E))]


# ---- permute --------------------------------------------------------------------------------------

@pytest.mark.parametrize("E", [1, 8, 256])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("T", [0, 1, 3, 4097])
@pytest.mark.parametrize("H", [8, 40])
def test_permute_bitexact_narrow_rows(seed, H, T, k, E):
    idx = _routing(T, k, E).cuda()
    for dtype in ROW_DTYPES:
        x = _rows(T, H, dtype, "cuda")
        for pad_to in (1, 16, 128):
            for capacity in _capacity_cases(T, k, E):
                _check_permute(x, idx, E, pad_to, capacity)


WIDE_CASES = [
    # T, H, k, E, pad_to, capacity, dtype
    (4097, 7168, 8, 256, 1, None, torch.bfloat16),
    (4097, 7168, 8, 256, 128, None, torch.bfloat16),
    (4097, 7168, 8, 256, 16, 100, torch.bfloat16),
    (4097, 7168, 2, 8, 128, 700, torch.float16),
    (4097, 7168, 8, 8, 1, None, "fp8"),
    (4097, 2048, 8, 256, 16, None, torch.float32),
    (4097, 2048, 1, 1, 128, None, "fp8"),
    (4097, 2048, 2, 8, 16, 0, torch.float32),
    (3, 7168, 8, 256, 128, None, torch.bfloat16),
    (1, 2048, 2, 8, 16, None, torch.float16),
    (0, 7168, 8, 256, 16, None, torch.bfloat16),
]


@pytest.mark.parametrize("T,H,k,E,pad_to,capacity,dtype", WIDE_CASES)
def test_permute_bitexact_wide_rows(seed, T, H, k, E, pad_to, capacity, dtype):
    if dtype == "fp8":
        if FP8 is None:
            pytest.skip("torch has no float8_e4m3fn")
        dtype = FP8
    idx = _routing(T, k, E, distinct=True).cuda()
    _check_permute(_rows(T, H, dtype, "cuda"), idx, E, pad_to, capacity)


@pytest.mark.parametrize("H,dtype", [(7, torch.bfloat16), (3, torch.float32), (6, torch.float32), (5, torch.uint8),
                                     (12, torch.float16), (0, torch.float32)])
def test_permute_any_row_width(seed, H, dtype):
    """Rows whose byte size is not a multiple of 16 take the 8/4/2/1-byte paths."""
    T, k, E = 300, 3, 8
    x = torch.randint(0, 100, (T, H)).to(dtype).cuda() if dtype == torch.uint8 else _rows(T, H, dtype, "cuda")
    idx = _routing(T, k, E).cuda()
    for pad_to, capacity in [(1, None), (16, 40)]:
        _check_permute(x, idx, E, pad_to, capacity)


def test_permute_int64_ids_strided_rows_noncontiguous_idx(seed):
    T, H, k, E = 1000, 64, 4, 16
    base = _rows(T, 3 * H, torch.bfloat16, "cuda")
    x = base[:, H:2 * H]  # row stride 3H, offset H: 16-byte aligned rows
    idx = _routing(T, k, E, dtype=torch.int64).cuda()
    idx_t = idx.t().contiguous().t()  # same values, column-major
    assert not idx_t.is_contiguous()
    _check_permute(x, idx_t, E, 8, 100)
    x_odd = _rows(T, 3 * H, torch.bfloat16, "cuda")[:, 1:H + 1]  # misaligned by 2 bytes
    _check_permute(x_odd, idx, E, 8, None)


@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("capacity", [None, 1000, 0])
def test_permute_all_tokens_on_one_expert(seed, k, capacity):
    T, H, E = 4097, 256, 256
    idx = torch.full((T, k), E - 1, dtype=torch.int32, device="cuda")
    x = _rows(T, H, torch.bfloat16, "cuda")
    _, _, tpe = _check_permute(x, idx, E, 128, capacity)
    kept = T * k if capacity is None else min(T * k, capacity)
    assert int(tpe[E - 1]) == (kept + 127) // 128 * 128 and int(tpe[:-1].sum()) == 0


def test_permute_out_of_range_ids_are_dropped(seed):
    """Ids outside [-1, E): exact mode raises as the CPU op does (it reads the count back anyway);
    the no-sync mode cannot check without a sync and treats them as -1."""
    T, H, k, E = 200, 16, 4, 8
    idx = _routing(T, k, E, dtype=torch.int64)
    bad = torch.rand(T, k) < 0.2
    idx[bad] = torch.tensor([E, E + 5, -7, 1 << 40])[torch.randint(0, 4, (int(bad.sum()),))]
    x = _rows(T, H, torch.float32, "cuda")
    clean = idx.clone()
    clean[bad] = -1
    cap = 20
    got = ops.permute(x, idx.cuda(), E, 4, cap, False)
    ref = ops.permute(x.cpu(), clean, E, 4, cap, False)
    for g, r, name in zip(got, ref, ("x_perm", "row_map", "tokens_per_expert")):
        _assert_bits(g, r, name)
    with pytest.raises(RuntimeError, match=r"idx holds \d+ expert id\(s\) outside \[-1, num_experts=8\)"):
        ops.permute(x, idx.cuda(), E, 4, cap, True)
    with pytest.raises(RuntimeError, match="outside"):
        ops.permute(x.cpu(), idx, E, 4, cap, True)
    # The count restarts at every call: clean ids pass again, with the CPU op's result.
    got = ops.permute(x, clean.cuda(), E, 4, cap, True)
    for g, r, name in zip(got, ops.permute(x.cpu(), clean, E, 4, cap, True), ("x_perm", "row_map", "tpe")):
        _assert_bits(g, r, name)


@pytest.mark.parametrize("sync", [True, False])
def test_permute_rows_with_scales(seed, sync):
    """fp8 (or bf16) rows with per-row scales: the scales land on their rows' positions, bit for
    bit as on the CPU, zero elsewhere (padding and the no-sync worst-case tail)."""
    T, H, k, E = 1000, 64, 4, 16
    x = _rows(T, H, FP8 if FP8 is not None else torch.bfloat16)
    idx = _routing(T, k, E)
    scale = torch.rand(T, 2) + 0.5
    _poison([x.numel() * x.element_size() * k * 2, T * k * 2 * 4 * 2], 0x7F)
    got = moe_ext.permute(x.cuda(), idx.cuda(), E, pad_to=16, capacity=200, sync=sync, x_scale=scale.cuda())
    want = moe_ext.permute(x, idx, E, pad_to=16, capacity=200, sync=True, x_scale=scale)
    rows = int(want[2].sum())
    assert torch.equal(got[1].cpu(), want[1])
    _assert_bits(got[0].cpu()[:rows], want[0], "x_perm")
    assert torch.equal(got[3].cpu()[:rows], want[3]) and (got[3].cpu()[rows:] == 0).all()


def test_permute_python_wrapper_defaults_to_no_sync(seed):
    T, H, k, E, pad_to = 100, 8, 2, 4, 16
    x, idx = _rows(T, H, torch.float32, "cuda"), _routing(T, k, E).cuda()
    x_perm, _, tpe = moe_ext.permute(x, idx, E, pad_to=pad_to)
    n = T * k
    assert x_perm.shape[0] == n + min(n, E) * (pad_to - 1)
    exact, _, tpe2 = moe_ext.permute(x, idx, E, pad_to=pad_to, sync=True)
    assert exact.shape[0] == int(tpe2.sum()) and torch.equal(tpe, tpe2)
    assert torch.equal(x_perm[: exact.shape[0]], exact) and (x_perm[exact.shape[0]:] == 0).all()


@pytest.mark.parametrize("T,H,k,E,max_rows,capacity", [
    (0, 8, 2, 4, 3, None), (1, 40, 1, 1, 1, None), (4097, 2048, 8, 256, 40, None), (777, 136, 2, 8, 777, None),
    (3000, 7168, 2, 8, 200, 150), (5000, 16, 4, 13000, 2, None)])
def test_permute_masked_layout_matches_cpu(seed, T, H, k, E, max_rows, capacity):
    # The masked layout [E, max_rows, H] (decode at a world of one): bit for bit the CPU op's, its
    # unused rows zero (poisoned first), without a host synchronisation: captured in a CUDA graph.
    x, idx = _rows(T, H, torch.bfloat16, "cuda"), _routing(T, k, E).cuda()
    if T:
        idx[: T // 2, 0] = E - 1  # one expert past max_rows
    cap = -1 if capacity is None else capacity
    ref = ops.permute(x.cpu(), idx.cpu(), E, 1, cap, True, max_rows)
    for exact in (True, False):
        _poison(_nbytes(*ref), 0xFF)
        got = ops.permute(x, idx, E, 1, cap, exact, max_rows)
        for g, r, name in zip(got, ref, ("x_perm", "row_map", "tokens_per_expert")):
            _assert_bits(g, r, f"exact={exact} {name}")
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        moe_ext.permute(x, idx, E, capacity=capacity, max_rows=max_rows)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        outs = moe_ext.permute(x, idx, E, capacity=capacity, max_rows=max_rows)
    idx.copy_(_routing(T, k, E).cuda())
    graph.replay()
    torch.cuda.synchronize()
    ref = ops.permute(x.cpu(), idx.cpu(), E, 1, cap, True, max_rows)
    assert outs[0].shape == (E, max_rows, H)
    for g, r, name in zip(outs, (ref[0].view(E, max_rows, H), *ref[1:]), ("x_perm", "row_map", "tokens_per_expert")):
        _assert_bits(g, r, f"replay {name}")


def test_accumulate_load_matches_cpu(seed):
    E = 300
    load, ema = torch.randint(0, 10 ** 6, (E,)), torch.rand(E + 1, dtype=torch.float64)
    tpe = torch.randint(0, 5000, (E,), dtype=torch.int32)
    want = (load.clone(), ema.clone())
    ops.accumulate_load_(*want, tpe, 0.9)
    got = (load.cuda(), ema.cuda())
    ops.accumulate_load_(*got, tpe.cuda(), 0.9)
    _assert_bits(got[0], want[0], "load")
    _assert_bits(got[1], want[1], "load_ema")


# ---- unpermute and its backward ----------------------------------------------------------------------

def _permuted(T, H, k, E, pad_to, capacity, dtype, exact=False, drop=0.1):
    idx = _routing(T, k, E, drop=drop).cuda()
    x = _rows(T, H, dtype, "cuda")
    x_perm, row_map, _ = ops.permute(x, idx, E, pad_to, -1 if capacity is None else capacity, exact)
    return x_perm, row_map


def _weights(T, k, kind, dtype):
    if kind is None:
        return None
    return torch.rand(T, k, device="cuda").to(torch.float32 if kind == "f32" else dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weights", [None, "f32", "same"])
@pytest.mark.parametrize("T,H,k,E,pad_to,capacity", [
    (0, 8, 2, 8, 1, None), (1, 8, 1, 1, 1, None), (3, 40, 2, 8, 16, None), (4097, 40, 8, 256, 16, 100),
    (4097, 2048, 8, 256, 1, None), (4097, 2048, 12, 64, 16, None), (257, 7168, 2, 8, 128, 40),
    (100, 7, 3, 4, 1, None),  # odd row bytes: the scalar path
])
def test_unpermute_bitexact(seed, dtype, weights, T, H, k, E, pad_to, capacity):
    y, row_map = _permuted(T, H, k, E, pad_to, capacity, dtype)
    w = _weights(T, k, weights, dtype)
    ref = ops.unpermute(y.cpu(), row_map.cpu(), None if w is None else w.cpu())
    _poison(_nbytes(ref), 0xFF)
    got = ops.unpermute(y, row_map, w)
    _assert_bits(got, ref, f"unpermute {dtype} weights={weights}")


def test_unpermute_strided_rows(seed):
    T, H, k, E = 500, 64, 4, 8
    y_full, row_map = _permuted(T, 2 * H, k, E, 4, None, torch.bfloat16)
    for y in (y_full[:, :H], y_full[:, 1:H + 1]):  # aligned and misaligned rows, row stride 2H
        w = torch.rand(T, k, device="cuda")
        _assert_bits(ops.unpermute(y, row_map, w), ops.unpermute(y.cpu(), row_map.cpu(), w.cpu()), "strided y")


def test_unpermute_skips_out_of_range_rows(seed):
    T, H, k = 64, 16, 3
    y = torch.randn(50, H, device="cuda")
    row_map = torch.randint(-1, 50, (T, k), device="cuda")
    bad = torch.rand(T, k, device="cuda") < 0.2
    row_map_bad = row_map.masked_fill(bad, 50)  # one past the last row
    w = torch.rand(T, k, device="cuda")
    ref = ops.unpermute(y.cpu(), row_map.masked_fill(bad, -1).cpu(), w.cpu())
    _assert_bits(ops.unpermute(y, row_map_bad, w), ref, "unpermute with rows out of range")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weights", [None, "f32", "same"])
@pytest.mark.parametrize("T,H,k,E,pad_to,capacity", [
    (0, 8, 2, 8, 16, None), (3, 40, 2, 8, 16, None), (4097, 40, 8, 256, 16, 100), (4097, 2048, 8, 256, 1, None),
    (1000, 512, 12, 64, 16, None), (100, 7, 3, 4, 4, None),
])
def test_unpermute_backward_matches_cpu(seed, dtype, weights, T, H, k, E, pad_to, capacity):
    y, row_map = _permuted(T, H, k, E, pad_to, capacity, dtype)
    w = _weights(T, k, weights, dtype)
    g = torch.randn(T, H, device="cuda").to(dtype)
    ref_gy, ref_gw = ops.unpermute_backward(g.cpu(), y.cpu(), row_map.cpu(), None if w is None else w.cpu())
    _poison(_nbytes(ref_gy, ref_gw), 0xFF)
    gy, gw = ops.unpermute_backward(g, y, row_map, w)
    _assert_bits(gy, ref_gy, f"grad_y {dtype} weights={weights}")  # rows with no slot: zero
    assert gw.dtype == ref_gw.dtype and gw.shape == ref_gw.shape
    if w is not None:  # the CPU op adds the float64 dot products in the kernel's lane order, unfused
        _assert_bits(gw, ref_gw, f"grad_w {dtype} weights={weights}")


def test_unpermute_backward_grad_out_dtype_and_layout(seed):
    """grad_out in another dtype / non-contiguous is converted like the CPU op converts it."""
    T, H, k, E = 300, 64, 2, 8
    y, row_map = _permuted(T, H, k, E, 8, None, torch.bfloat16)
    g = torch.randn(H, T, device="cuda").t()  # float32, column-major
    w = torch.rand(T, k, device="cuda")
    ref_gy, ref_gw = ops.unpermute_backward(g.cpu(), y.cpu(), row_map.cpu(), w.cpu())
    gy, gw = ops.unpermute_backward(g, y, row_map, w)
    _assert_bits(gy, ref_gy, "grad_y")
    _assert_bits(gw, ref_gw, "grad_w")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("pad_to,capacity", [(1, None), (16, 30)])
def test_autograd_cuda_matches_cpu(seed, dtype, pad_to, capacity):
    """permute -> scale -> unpermute with gradients for x and the weights, CUDA (no-sync) vs CPU."""
    T, H, k, E = 513, 96, 4, 16
    idx = _routing(T, k, E)
    x0 = torch.randn(T, H).to(dtype)
    w0 = torch.rand(T, k)
    g = torch.randn(T, H).to(dtype)
    grads = {}
    for device in ("cpu", "cuda"):
        # copy=True: on the CPU a plain .to() returns x0 itself, which requires_grad_ would turn
        # into a leaf that the CUDA pass then copies (a non-leaf, whose .grad stays None).
        x = x0.to(device, copy=True).requires_grad_()
        w = w0.to(device, copy=True).requires_grad_()
        x_perm, row_map, _ = moe_ext.permute(x, idx.to(device), E, pad_to=pad_to, capacity=capacity)
        out = moe_ext.unpermute(x_perm * 3, row_map, w)
        out.backward(g.to(device))
        grads[device] = (out.detach().cpu(), x.grad.cpu(), w.grad.cpu())
    _assert_bits(grads["cuda"][0], grads["cpu"][0], "forward")
    _assert_bits(grads["cuda"][1], grads["cpu"][1], "grad x")
    torch.testing.assert_close(grads["cuda"][2], grads["cpu"][2], rtol=1e-5, atol=1e-4)


# ---- graphs, compile, opcheck, errors -------------------------------------------------------------

def test_cuda_graph_capture_and_replay_with_new_routing(seed):
    T, H, k, E, pad_to, capacity = 777, 256, 4, 16, 16, 180
    x = _rows(T, H, torch.bfloat16, "cuda")
    idx = _routing(T, k, E).cuda()
    w = torch.rand(T, k, device="cuda")

    def step():
        x_perm, row_map, tpe = moe_ext.permute(x, idx, E, pad_to=pad_to, capacity=capacity)  # no-sync on CUDA
        return x_perm, row_map, tpe, moe_ext.unpermute(x_perm, row_map, w)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for trial in range(4):
        x.copy_(_rows(T, H, torch.bfloat16, "cuda"))
        idx.copy_(_routing(T, k, E, drop=0.05 * trial).cuda())
        w.copy_(torch.rand(T, k, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        ref = ops.permute(x.cpu(), idx.cpu(), E, pad_to, capacity, False)
        ref_out = ops.unpermute(ref[0], ref[1], w.cpu())
        for g, r, name in zip(outs, (*ref, ref_out), ("x_perm", "row_map", "tokens_per_expert", "unpermute")):
            _assert_bits(g, r, f"replay {trial}: {name}")


def test_torch_compile_fullgraph(seed):
    T, H, k, E = 300, 64, 2, 8
    x = _rows(T, H, torch.bfloat16, "cuda")
    idx = _routing(T, k, E).cuda()
    w = torch.rand(T, k, device="cuda")

    def f(x_, idx_, w_):
        x_perm, row_map, _ = moe_ext.permute(x_, idx_, E, pad_to=8, capacity=70)
        return moe_ext.unpermute(x_perm * 2, row_map, w_)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(x, idx, w)
    _assert_bits(got, f(x, idx, w).cpu(), "compiled")


def test_opcheck_cuda(seed):
    idx = _routing(10, 2, 6).cuda()
    x = torch.randn(10, 16, device="cuda", dtype=torch.float64, requires_grad=True)
    for args in [(x, idx, 6, 1, -1, False), (x, idx, 6, 4, 2, False), (x, idx, 6, 4, -1, True)]:
        torch.library.opcheck(ops.permute.default, args)
    _, row_map, tpe = ops.permute(x.detach(), idx, 6, 2, -1, True)
    y = torch.randn(int(tpe.sum()), 16, device="cuda", dtype=torch.float64, requires_grad=True)
    w = torch.rand(10, 2, device="cuda", dtype=torch.float64, requires_grad=True)
    for args in [(y, row_map, w), (y, row_map, None), (y.detach().bfloat16(), row_map, w.detach().float())]:
        torch.library.opcheck(ops.unpermute.default, args)
    torch.library.opcheck(ops.unpermute_backward.default,
                          (torch.randn(10, 16, device="cuda", dtype=torch.float64), y.detach(), row_map, w.detach()))


def _error(fn):
    try:
        fn()
    except RuntimeError as e:
        return str(e).splitlines()[0]
    raise AssertionError("no error raised")


@pytest.mark.parametrize("case", ["idx_dtype", "idx_rows", "pad_to", "capacity", "row_map_dtype", "weights_shape",
                                  "weights_dtype", "grad_out_shape"])
def test_errors_match_cpu(case):
    """The CUDA adapters run the same checks as the CPU ops: same message, naming the argument."""
    x, idx = torch.randn(8, 16), torch.randint(0, 4, (8, 2), dtype=torch.int32)
    y, row_map, w = torch.randn(20, 16), torch.randint(-1, 20, (8, 2)), torch.rand(8, 2)
    calls = {
        "idx_dtype": lambda d: ops.permute(x.to(d), idx.float().to(d), 4, 1, -1, False),
        "idx_rows": lambda d: ops.permute(x.to(d), idx[:5].to(d), 4, 1, -1, False),
        "pad_to": lambda d: ops.permute(x.to(d), idx.to(d), 4, 0, -1, False),
        "capacity": lambda d: ops.permute(x.to(d), idx.to(d), 4, 1, -3, False),
        "row_map_dtype": lambda d: ops.unpermute(y.to(d), row_map.int().to(d), w.to(d)),
        "weights_shape": lambda d: ops.unpermute(y.to(d), row_map.to(d), w[:4].to(d)),
        "weights_dtype": lambda d: ops.unpermute(y.bfloat16().to(d), row_map.to(d), w.half().to(d)),
        "grad_out_shape": lambda d: ops.unpermute_backward(torch.randn(8, 15).to(d), y.to(d), row_map.to(d), w.to(d)),
    }
    cpu_msg = _error(lambda: calls[case]("cpu"))
    cuda_msg = _error(lambda: calls[case]("cuda"))
    assert cuda_msg == cpu_msg


# ---- 64-bit offsets ---------------------------------------------------------------------------------

def test_past_int32_elements(seed):
    """T*k*H > 2^31 elements: permute, unpermute (k > 8: the chunked-slot path) and its backward."""
    T, k, H, E, pad_to = 16500, 16, 8192, 64, 16
    assert T * k * H > 2 ** 31
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2 ** 30:
        pytest.skip(f"needs ~24 GiB of free GPU memory, {free / 2 ** 30:.1f} GiB free")
    idx = _routing(T, k, E, drop=0.05, dtype=torch.int64)
    x = _rows(T, H, torch.bfloat16, "cuda")
    x_perm, row_map, tpe = ops.permute(x, idx.cuda(), E, pad_to, -1, False)
    # The routing does not depend on H: the CPU op on 8-wide rows gives the reference integers.
    _, ref_map, ref_tpe = ops.permute(torch.zeros(T, 8), idx, E, pad_to, -1, False)
    _assert_bits(row_map, ref_map, "row_map")
    _assert_bits(tpe, ref_tpe, "tokens_per_expert")
    expect = torch.zeros_like(x_perm)
    for j in range(k):
        ok = row_map[:, j] >= 0
        expect[row_map[ok, j]] = x[ok]
    assert torch.equal(x_perm, expect), "x_perm rows"
    del expect

    w = torch.rand(T, k, device="cuda")
    out = ops.unpermute(x_perm, row_map, w)
    acc = torch.zeros(T, H, device="cuda")
    for j in range(k):  # the same float32 multiply-then-add, slot by slot, in torch
        r = row_map[:, j]
        term = w[:, j, None] * x_perm[r.clamp(min=0)].float()
        acc = torch.where((r >= 0)[:, None], acc + term, acc)
    assert torch.equal(out, acc.to(torch.bfloat16)), "unpermute"
    del acc, out

    grad_y, grad_w = ops.unpermute_backward(x, x_perm, row_map, None)
    assert grad_w.numel() == 0
    assert torch.equal(grad_y, x_perm), "unpermute_backward without weights is permute"
