"""Where the time goes: the device kernels of a few calls under torch.profiler, largest total first.

    python bench/profile_kernels.py                       # on CUDA: the cases below at full size
    python bench/profile_kernels.py --cases gating --top 15 --json prof.json

Cases:
  layer    moe_ext.MoE forward + backward, Mixtral shape (T=16384 H=4096 F=14336 E=8 k=2, bf16),
           once as built (the activation kept) and once with recompute_activation=True
  gating   topk_gating at T=16384 E=256 k=8, groups 8/4, sigmoid, expert bias (DeepSeek-V3), and the
           same at T=128 (decode: where the launches and the cross-tile kernel, not the rows, cost)
  permute  permute (no host sync) then unpermute at T=16384 H=7168 k=8 E=256, bf16: the index
           kernels against the row copies
Each case runs --warmup calls, then --iters calls under the profiler; the table lists every
kernel (CUDA) or op (CPU) with its calls per iteration, total and mean time per iteration and
share of the iteration's device time. The bench's stage tables say how fast; this says which
kernel to work on next. --small runs tiny shapes (what CI runs on the CPU, to keep it working).
"""
import argparse
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import moe_ext

FULL = dict(layer=dict(T=16384, H=4096, F=14336, E=8, k=2), gating=dict(T=16384, E=256, k=8),
            permute=dict(T=16384, H=7168, E=256, k=8))
SMALL = dict(layer=dict(T=256, H=64, F=128, E=8, k=2), gating=dict(T=512, E=64, k=8),
             permute=dict(T=512, H=64, E=64, k=8))


def layer_case(shape, device, dtype, recompute):
    torch.manual_seed(0)
    layer = moe_ext.MoE(shape["H"], shape["F"], shape["E"], shape["k"], device=device, dtype=dtype,
                        recompute_activation=recompute)
    x = torch.randn(shape["T"], shape["H"], device=device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)

    def step():
        for p in list(layer.parameters()) + [x]:
            p.grad = None
        layer(x).backward(g)

    return step


def gating_case(shape, device):
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(shape["T"], shape["E"], generator=gen, device=device)
    bias = torch.randn(shape["E"], generator=gen, device=device) * 0.01
    groups = 8 if shape["E"] % 8 == 0 else None
    return lambda: moe_ext.topk_gating(logits, shape["k"], score="sigmoid", expert_bias=bias, num_groups=groups,
                                       topk_groups=4 if groups else None)


def permute_case(shape, device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape["T"], shape["H"], generator=gen, device=device).to(dtype)
    idx = torch.rand(shape["T"], shape["E"], generator=gen, device=device).topk(shape["k"], dim=1).indices
    w = torch.rand(shape["T"], shape["k"], generator=gen, device=device)

    def step():
        x_perm, row_map, _ = moe_ext.permute(x, idx, shape["E"], sync=False)
        moe_ext.unpermute(x_perm, row_map, w)

    return step


def kernel_table(fn, iters, warmup, on_cuda):
    """[(name, calls per iteration, total us per iteration)] of the device kernels (CPU ops without CUDA)."""
    for _ in range(warmup):
        fn()
    if on_cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        if on_cuda:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        # NOTE: on CUDA the kernels themselves (device_type CUDA); on the CPU the ATen/moe_ext ops
        # that do the work (self time, so that nested ops are not counted twice).
        t = e.self_device_time_total if on_cuda else e.self_cpu_time_total
        if on_cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if t > 0:
            rows.append((e.key, e.count / iters, t / iters))
    return sorted(rows, key=lambda r: -r[2])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="layer,gating,permute")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--small", action="store_true", help="tiny shapes (CI on the CPU)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    on_cuda = device.type == "cuda"
    shapes = SMALL if args.small or not on_cuda else FULL
    dtype = torch.bfloat16 if on_cuda else torch.float32
    cases = []
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if name == "layer":
            for recompute in (False, True):
                label = f"layer fwd+bwd {shapes['layer']}" + (" recompute_activation" if recompute else "")
                cases.append((label, layer_case(shapes["layer"], device, dtype, recompute)))
        elif name == "gating":
            for shape in (shapes["gating"], dict(shapes["gating"], T=128)):
                cases.append((f"gating {shape} groups 8/4 sigmoid bias", gating_case(shape, device)))
        elif name == "permute":
            cases.append((f"permute + unpermute {shapes['permute']}", permute_case(shapes["permute"], device, dtype)))
        else:
            ap.error(f"unknown case {name!r} (layer, gating, permute)")
    out = {}
    for label, fn in cases:
        rows = kernel_table(fn, args.iters, args.warmup, on_cuda)
        total = sum(r[2] for r in rows)
        print(f"\n# {label}: {total / 1e3:.3f} ms of {'device' if on_cuda else 'CPU'} time per iteration "
              f"({device}, {dtype}, {args.iters} iterations)")
        print(f"{'share':>6} {'us/iter':>10} {'calls':>6} {'us/call':>9}  kernel")
        for name, calls, t in rows[:args.top]:
            print(f"{100 * t / total:5.1f}% {t:10.1f} {calls:6.1f} {t / calls:9.1f}  {name[:110]}")
        out[label] = dict(total_us=total, kernels=[dict(name=n, calls=c, us=t) for n, c, t in rows])
        del fn
        if on_cuda:
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), dtype=str(dtype), iters=args.iters, cases=out), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
