"""permute / unpermute (and unpermute's backward) on CUDA: moe_ext against plain torch, same run.

    python bench/permute_bench.py                      # T=16384 H=7168 k=8 E=256 bf16
    python bench/permute_bench.py --tokens 4096 --pad-to 128 --capacity-factor 1.25 --json out.json

Times are medians of CUDA-event pairs around each call, L2 flushed (a memset of twice its size)
before every timed iteration, as bench/common.cuh does for the C++ benchmarks. GB/s counts the
row bytes a stage must move (permute and unpermute: T*H + T*k*H elements; backward: T*H +
2*T*k*H); "%ceil" divides by the copy ceiling (2.95 TB/s measured on the lent H100, --ceil).
The torch baselines are what a user would write without this library:
  permute    argsort(idx, stable) + index_select (+ bincount for the counts)
  unpermute  scatter back to (token, slot) order + weighted sum over k in float32, and
             index_add_ of the weighted rows into a float32 [T, H]
  backward   gather of grad_out per row times the weight, and the row-wise dot for grad_w
Each moe_ext result is checked against its baseline before timing.
"""
import argparse
import json
import math
import sys

import torch
from cuda_timer import CudaTimer

import moe_ext  # noqa: F401  (registers torch.ops.moe_ext)

ops = torch.ops.moe_ext


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--pad-to", type=int, default=1)
    p.add_argument("--capacity-factor", type=float, default=0.0, help="0: no capacity")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--ceil", type=float, default=2950.0, help="copy ceiling in GB/s")
    p.add_argument("--no-flush", action="store_true", help="keep L2 warm between iterations")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p.parse_args(argv)


def routing(T, k, E, device):
    """k distinct experts per token, uniformly at random (a balanced router)."""
    return torch.rand(T, E, device=device).argsort(dim=1)[:, :k].to(torch.int32).contiguous()


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        # No GPU (the CPU build machine): a skip, not a failure (as ep_bench.py does).
        print("permute_bench: no CUDA device; skipped")
        return 0
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    T, H, k, E = args.tokens, args.hidden, args.topk, args.experts
    es = torch.empty((), dtype=dtype).element_size()
    cap = math.ceil(args.capacity_factor * T * k / E) if args.capacity_factor > 0 else -1
    x = torch.randn(T, H, device="cuda").to(dtype)
    idx = routing(T, k, E, "cuda")
    w = torch.rand(T, k, device="cuda")
    g = torch.randn(T, H, device="cuda").to(dtype)
    timer = CudaTimer(args.iters, args.warmup, not args.no_flush)
    dev = torch.cuda.get_device_properties(0)
    print(f"# permute_bench: T={T} H={H} k={k} E={E} pad_to={args.pad_to} capacity={cap} {args.dtype}")
    print(f"# device: {dev.name}, {dev.multi_processor_count} SMs; torch {torch.__version__}; "
          f"median of {args.iters} after {args.warmup} warm-up, L2 {'warm' if args.no_flush else 'flushed'}")
    print(f"# %ceil: GB/s / {args.ceil:.0f} GB/s copy ceiling")
    print(f"#{'stage':>10} {'impl':>28} {'time(us)':>10} {'sd(us)':>8} {'GB/s':>8} {'%ceil':>6} {'vs torch':>9}")
    rows = []

    def report(stage, impl, t, nbytes, base_us=None):
        us, sd = t
        gbps = nbytes / (us * 1e-6) / 1e9
        speed = f"{base_us / us:8.2f}x" if base_us else f"{'':>9}"
        print(f" {stage:>10} {impl:>28} {us:10.1f} {sd:8.1f} {gbps:8.1f} {100 * gbps / args.ceil:6.1f} {speed}")
        rows.append(dict(stage=stage, impl=impl, time_us=us, stddev_us=sd, bytes=nbytes, gbps=gbps,
                         frac_ceiling=gbps / args.ceil))
        return us

    flat = idx.view(-1)

    # ---- permute (no capacity / padding in the torch baseline: it has neither)
    perm_bytes = (T + T * k) * H * es

    def torch_permute():
        order = torch.argsort(flat, stable=True)
        return x.index_select(0, order // k), order, torch.bincount(flat, minlength=E)

    ref_perm, order, _ = torch_permute()
    x_perm, row_map, tpe = ops.permute(x, idx, E, args.pad_to, cap, False)
    if cap < 0 and args.pad_to == 1:
        assert torch.equal(x_perm[: T * k], ref_perm), "moe_ext permute != argsort + index_select"
    t_torch = report("permute", "torch argsort+index_select", timer(torch_permute), perm_bytes)
    report("permute", "moe_ext (no sync)", timer(lambda: ops.permute(x, idx, E, args.pad_to, cap, False)),
           perm_bytes, t_torch)
    report("permute", "moe_ext (sync=True)", timer(lambda: ops.permute(x, idx, E, args.pad_to, cap, True)),
           perm_bytes, t_torch)

    # ---- unpermute: y is the permuted rows
    y = x_perm
    unperm_bytes = (T * k + T) * H * es
    w_sorted = w.view(-1)[order]
    token_of_row = order // k

    def torch_unpermute_scatter():
        back = torch.empty_like(ref_perm)
        back[order] = ref_perm  # (token, slot) order
        return (back.view(T, k, H).float() * w[..., None]).sum(1).to(dtype)

    def torch_unpermute_index_add():
        acc = torch.zeros(T, H, device="cuda")
        acc.index_add_(0, token_of_row, ref_perm.float() * w_sorted[:, None])
        return acc.to(dtype)

    out = ops.unpermute(y, row_map, w)
    if cap < 0:
        torch.testing.assert_close(out.float(), torch_unpermute_scatter().float(), rtol=2e-2, atol=2e-2)
    t_torch = report("unpermute", "torch scatter+weighted sum", timer(torch_unpermute_scatter), unperm_bytes)
    t_torch2 = report("unpermute", "torch index_add_", timer(torch_unpermute_index_add), unperm_bytes)
    report("unpermute", "moe_ext", timer(lambda: ops.unpermute(y, row_map, w)), unperm_bytes, min(t_torch, t_torch2))

    # ---- unpermute backward
    bwd_bytes = (T + 2 * T * k) * H * es

    def torch_backward():
        g_rows = g.index_select(0, token_of_row)
        grad_y = (g_rows.float() * w_sorted[:, None]).to(dtype)
        grad_w = torch.empty(T * k, device="cuda")
        grad_w[order] = (ref_perm.float() * g_rows.float()).sum(1)
        return grad_y, grad_w.view(T, k)

    gy, gw = ops.unpermute_backward(g, y, row_map, w)
    if cap < 0 and args.pad_to == 1:
        ref_gy, ref_gw = torch_backward()
        assert torch.equal(gy[: T * k], ref_gy), "moe_ext grad_y != torch"
        torch.testing.assert_close(gw, ref_gw, rtol=1e-3, atol=1e-2)  # torch sums in float32
    t_torch = report("backward", "torch gather+mul+dot", timer(torch_backward), bwd_bytes)
    report("backward", "moe_ext", timer(lambda: ops.unpermute_backward(g, y, row_map, w)), bwd_bytes, t_torch)

    floor_us = perm_bytes / (args.ceil * 1e9) * 1e6
    print(f"# floors at {args.ceil:.0f} GB/s: permute/unpermute {floor_us:.1f} us, "
          f"backward {bwd_bytes / (args.ceil * 1e9) * 1e6:.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), device=dev.name, torch=torch.__version__, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
