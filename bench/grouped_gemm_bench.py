"""Grouped expert GEMM on CUDA: moe_ext against torch._grouped_mm and a per-expert torch.matmul loop, same run.

    python bench/grouped_gemm_bench.py                         # the issue's prefill and decode shapes
    python bench/grouped_gemm_bench.py --shapes 32768x8x4096x14336 --load zipf --activation swiglu --json out.json

A shape is MxExKxN: a [M, K] split over E experts, b [E, K, N] ([E, N, K] with --trans-b). Loads:
uniform (M / E rows each) and Zipf(1.2) (expert e gets M * (e+1)^-1.2 / sum, exact counts, not
rounded to any multiple). Times are medians of CUDA-event pairs, L2 flushed (a memset of twice its
size) before every timed iteration, as bench/common.cuh does. TFLOP/s counts 2*M*K*N; "%ceil" is
against 764 TFLOP/s (dense bf16 cuBLAS on the lent H100, --ceil-tflops); GB/s counts a, the weights
of experts with rows, and the output (decode is memory-bound: compare with 2950 GB/s, --ceil-bw).
The implementations:
  moe_ext[k]       moe_ext.grouped_gemm, counts on the device (one launch, no host sync), with
                   kernel k of --kernels (MOE_EXT_GROUPED_GEMM_KERNEL: auto, portable, sm90; and
                   sm90:1, the Hopper kernel with one wgmma batch kept in flight across K-stages,
                   MOE_EXT_SM90_MMA_IN_FLIGHT=1)
  torch._grouped_mm  where this torch has it and accepts the problem (else n/a, with the reason)
  torch.matmul loop  one matmul per expert; the counts are read to the host outside the timing
Every result is compared with the first moe_ext kernel's before timing (relative max error
printed); "vs ours" is that kernel's time / this row's time (> 1: faster than it).
"""
import argparse
import json
import math
import os
import sys

import torch
from cuda_timer import CudaTimer

import moe_ext


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="32768x8x4096x14336,32768x32x7168x4096,32768x32x2048x7168,512x32x7168x4096")
    p.add_argument("--load", default="both", choices=["uniform", "zipf", "both"])
    p.add_argument("--activation", default="none", choices=["none", "swiglu"])
    p.add_argument("--trans-b", action="store_true", help="b as [E, N, K] (nn.Linear weights)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--kernels", default="auto",
                   help="comma-separated moe_ext kernels to time: auto, portable, sm90, sm90:1 (sm90 needs an H100/H200)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--ceil-tflops", type=float, default=764.0)
    p.add_argument("--ceil-bw", type=float, default=2950.0, help="copy ceiling in GB/s")
    p.add_argument("--no-flush", action="store_true", help="keep L2 warm between iterations")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p.parse_args(argv)


def make_counts(M, E, zipf):
    """The same counts as bench_grouped_gemm.cu: uniform, or floor(M * w_e / sum w) + remainder."""
    if not zipf:
        return [M // E + (1 if e < M % E else 0) for e in range(E)]
    w = [(e + 1) ** -1.2 for e in range(E)]
    s = sum(w)
    c = [math.floor(M * x / s) for x in w]
    e = 0
    while sum(c) < M:
        c[e] += 1
        e = (e + 1) % E
    return c


def swiglu(h):
    n = h.shape[-1] // 2
    return torch.nn.functional.silu(h[..., :n]) * h[..., n:]


def rel_err(x, ref):
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        # No GPU (the CPU build machine): a skip, not a failure (as ep_bench.py does).
        print("grouped_gemm_bench: no CUDA device; skipped")
        return 0
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    act = None if args.activation == "none" else "swiglu"
    dev = torch.cuda.get_device_properties(0)
    timer = CudaTimer(args.iters, args.warmup, not args.no_flush)
    print(f"# grouped_gemm_bench: device {dev.name} ({dev.multi_processor_count} SMs), torch {torch.__version__}, "
          f"{args.dtype}, activation {args.activation}, trans_b {args.trans_b}, L2 "
          f"{'warm' if args.no_flush else 'flushed'}, {args.iters} timed + {args.warmup} warm-up iterations")
    print(f"# %ceil: TFLOP/s / {args.ceil_tflops:.0f}; GB/s for decode against {args.ceil_bw:.0f}")
    header = f"{'shape':>22} {'load':>8} {'impl':>22} {'time(us)':>10} {'sd':>8} {'TFLOP/s':>9} {'%ceil':>6} " \
             f"{'GB/s':>8} {'vs ours':>8} {'rel.err':>9}"
    print(header)
    rows = []
    for shape in args.shapes.split(","):
        M, E, K, N = (int(v) for v in shape.split("x"))
        n_out = N // 2 if act else N
        for zipf in ([False, True] if args.load == "both" else [args.load == "zipf"]):
            load = "zipf" if zipf else "uniform"
            counts = make_counts(M, E, zipf)
            counts_dev = torch.tensor(counts, dtype=torch.int32, device="cuda")
            a = (torch.rand(M, K, device="cuda") * 2 - 1).to(dtype)
            scale = math.sqrt(3.0 / K)
            b = ((torch.rand(E, K, N, device="cuda") * 2 - 1) * scale).to(dtype)
            if args.trans_b:
                b = b.transpose(1, 2).contiguous()
            b_kn = b.transpose(1, 2) if args.trans_b else b  # [E, K, N] view for torch
            flops = 2.0 * M * K * N
            nbytes = a.element_size() * (M * K + sum(1 for c in counts if c) * K * N + M * n_out)
            print(f"# {shape} {load}: max {max(counts)} rows/expert; floors {flops / args.ceil_tflops / 1e6:.0f} us "
                  f"(compute), {nbytes / args.ceil_bw / 1e3:.0f} us (memory)")

            def ours_with(kernel):
                name, _, in_flight = kernel.partition(":")

                def run():
                    os.environ["MOE_EXT_GROUPED_GEMM_KERNEL"] = name
                    os.environ["MOE_EXT_SM90_MMA_IN_FLIGHT"] = in_flight or "0"
                    return moe_ext.grouped_gemm(a, b, counts_dev, trans_b=args.trans_b, activation=act)
                return run

            kernels = args.kernels.split(",")
            ours = ours_with(kernels[0])

            def loop():
                out = torch.empty(M, n_out, dtype=dtype, device="cuda")
                start = 0
                for e, m in enumerate(counts):
                    if act:
                        out[start:start + m] = swiglu(a[start:start + m] @ b_kn[e])
                    else:  # NOTE: into out directly: a copy per expert would slow the baseline
                        torch.matmul(a[start:start + m], b_kn[e], out=out[start:start + m])
                    start += m
                return out

            offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).cuda()
            grouped_mm, gmm_note = None, ""
            if hasattr(torch, "_grouped_mm"):
                for b_try, note in ((b_kn, ""), (b_kn.transpose(1, 2).contiguous().transpose(1, 2), "K-major b")):
                    try:
                        torch._grouped_mm(a, b_try, offs=offs)
                        grouped_mm = (lambda b_=b_try: swiglu(torch._grouped_mm(a, b_, offs=offs)) if act
                                      else torch._grouped_mm(a, b_, offs=offs))
                        gmm_note = note
                        break
                    except (RuntimeError, TypeError, NotImplementedError) as exc:
                        gmm_note = f"n/a: {str(exc).splitlines()[0][:60]}"
            else:
                gmm_note = "n/a: this torch has no _grouped_mm"

            ref = ours()
            t_ours = None
            impls = [(f"moe_ext[{k}]", ours_with(k)) for k in kernels]
            impls += [("torch._grouped_mm", grouped_mm), ("torch.matmul loop", loop)]
            for impl, fn in impls:
                if fn is None:
                    print(f"{shape:>22} {load:>8} {impl:>22} {gmm_note}")
                    rows.append(dict(shape=shape, load=load, impl=impl, note=gmm_note))
                    continue
                err = rel_err(fn(), ref)
                us, sd = timer(fn)
                t_ours = us if t_ours is None else t_ours  # the first moe_ext kernel is the reference
                tflops = flops / us / 1e6
                gbps = nbytes / us / 1e3
                name = impl + (f" ({gmm_note})" if impl == "torch._grouped_mm" and gmm_note else "")
                print(f"{shape:>22} {load:>8} {name:>22} {us:10.1f} {sd:8.1f} {tflops:9.1f} "
                      f"{100 * tflops / args.ceil_tflops:6.1f} {gbps:8.0f} {t_ours / us:8.2f}x {err:9.2e}")
                rows.append(dict(shape=shape, load=load, impl=impl, note=gmm_note if impl == "torch._grouped_mm" else "",
                                 time_us=us, stddev_us=sd, tflops=tflops, frac_ceiling=tflops / args.ceil_tflops,
                                 gbps=gbps, frac_bw=gbps / args.ceil_bw, speed_vs_ours=t_ours / us, rel_err=err))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), device=dev.name, torch=torch.__version__, rows=rows), f, indent=2)
    os.environ.pop("MOE_EXT_GROUPED_GEMM_KERNEL", None)
    os.environ.pop("MOE_EXT_SM90_MMA_IN_FLIGHT", None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
