"""The `moe-ext` command line (also `python -m moe_ext`)."""
import argparse
import sys
import time

import torch

from .plan import add_plan_arguments, run_plan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _timed(fn, device, iters):
    """Runs fn once to warm up, then `iters` times; returns (last result, median seconds)."""
    out = fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return out, sorted(times)[len(times) // 2]


def check(args):
    """gating -> permute -> grouped GEMM (SwiGLU) -> grouped GEMM -> unpermute on a Mixtral-like
    layer, checked against a float64 reference computed with plain torch ops."""
    import moe_ext

    problems = [f"--{name} must be >= 1, got {getattr(args, name)}" for name in
                ("tokens", "hidden", "ffn", "experts", "topk", "iters") if getattr(args, name) < 1]
    if args.topk > args.experts >= 1:
        problems.append(f"--topk {args.topk} must be <= --experts {args.experts}")
    try:
        device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        problems.append(f"--device must be auto, cpu or cuda[:N], got {args.device!r}")
    else:
        if device.type not in ("cpu", "cuda"):
            problems.append(f"--device must be auto, cpu or cuda[:N], got {args.device!r}")
        elif device.type == "cuda" and not torch.cuda.is_available():
            problems.append("--device cuda, but torch sees no CUDA device")
    if problems:
        for msg in problems:
            print(f"moe-ext check: {msg}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    T, H, F, E, k = args.tokens, args.hidden, args.ffn, args.experts, args.topk
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(T, H, generator=gen).to(device, dtype)
    router = (torch.randn(H, E, generator=gen) / H ** 0.5).to(device, dtype)
    w1 = (torch.randn(E, H, 2 * F, generator=gen) / H ** 0.5).to(device, dtype)
    w2 = (torch.randn(E, F, H, generator=gen) / F ** 0.5).to(device, dtype)
    print(f"moe_ext {moe_ext.__version__} layer check on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{dtype}: T={T} tokens, hidden={H}, ffn={F}, {E} experts, top-{k}")

    logits = (x.float() @ router.float())
    stages = {}
    (w, idx, stats), stages["gating"] = _timed(lambda: moe_ext.topk_gating(logits, k), device, args.iters)
    (x_perm, row_map, tpe), stages["permute"] = _timed(lambda: moe_ext.permute(x, idx, E, sync=True), device, args.iters)
    h, stages["grouped_gemm w1+swiglu"] = _timed(
        lambda: moe_ext.grouped_gemm(x_perm, w1, tpe, activation="swiglu"), device, args.iters)
    y, stages["grouped_gemm w2"] = _timed(lambda: moe_ext.grouped_gemm(h, w2, tpe), device, args.iters)
    out, stages["unpermute"] = _timed(lambda: moe_ext.unpermute(y, row_map, w), device, args.iters)

    print(f"  logits      {tuple(logits.shape)} {logits.dtype}")
    print(f"  weights/idx {tuple(w.shape)} {w.dtype} / {idx.dtype}; tokens per expert {tpe.tolist()}")
    print(f"  x_perm      {tuple(x_perm.shape)} {x_perm.dtype}")
    print(f"  h           {tuple(h.shape)}  y {tuple(y.shape)}")
    print(f"  out         {tuple(out.shape)} {out.dtype}; aux_loss {stats.aux_loss.item():.4f} z_loss {stats.z_loss.item():.4f}")

    # float64 reference with plain torch ops, on the same routing.
    x64, w1_64, w2_64 = x.double().cpu(), w1.double().cpu(), w2.double().cpu()
    idx_c, w_c = idx.long().cpu(), w.double().cpu()
    ref = torch.zeros(T, H, dtype=torch.float64)
    for e in range(E):
        tok, slot = (idx_c == e).nonzero(as_tuple=True)
        if len(tok):
            g = x64[tok] @ w1_64[e]
            ref.index_add_(0, tok, (torch.nn.functional.silu(g[:, :F]) * g[:, F:]) @ w2_64[e] * w_c[tok, slot, None])
    err = (out.double().cpu() - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"  max |out - float64 reference| = {err:.3e} (max |reference| = {scale:.3e}, relative {err / max(scale, 1e-30):.2e})")

    print(f"\n  {'stage':<24}{'time':>12}")
    for name, t in stages.items():
        print(f"  {name:<24}{t * 1e3:>10.3f} ms")
    print(f"  {'total':<24}{sum(stages.values()) * 1e3:>10.3f} ms")
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 3e-2)
    if not err <= tol * max(scale, 1.0):
        print(f"FAILED: error above {tol} relative", file=sys.stderr)
        return 1
    return 0


def _check_arguments(p):
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=3584)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)


def main(argv=None):
    from . import bench, demo

    parser = argparse.ArgumentParser(prog="moe-ext", description="moe_ext: expert-parallel MoE kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="check one Mixtral-like layer against float64, then train a small MoE "
                                    "with EP over W ranks on synthetic data")
    demo.add_arguments(p)
    p.add_argument("--skip-check", action="store_true", help="only the training part")
    _check_arguments(sub.add_parser("check", help="run one MoE layer end to end and check it against float64"))
    bench.add_arguments(sub.add_parser("bench", help="every MoE stage against its torch baseline, same run"))
    plan_parser = sub.add_parser("plan", help="memory and communication of every EP / TP / DP layout of a model "
                                               "on a cluster (an estimator)")
    add_plan_arguments(plan_parser)
    args = parser.parse_args(argv)
    if args.command == "demo":
        problems = demo.argument_problems(args)
        if problems:  # NOTE: before the layer check, which takes seconds
            for msg in problems:
                print(f"moe-ext demo: {msg}", file=sys.stderr)
            return 2
        launched = demo._launched()
        if not args.skip_check and (launched is None or launched[0] == 0):  # (under torchrun: rank 0 checks)
            rc = check(_check_arguments_defaults(device=args.device))
            if rc:
                return rc
            print()
        return demo.run(args)
    if args.command == "check":
        return check(args)
    if args.command == "bench":
        return bench.run(args)
    if args.command == "plan":
        return run_plan(args, plan_parser)
    return 2


def _check_arguments_defaults(**overrides):
    p = argparse.ArgumentParser()
    _check_arguments(p)
    return p.parse_args([f"--{k}={v}" for k, v in overrides.items()])


if __name__ == "__main__":
    sys.exit(main())
