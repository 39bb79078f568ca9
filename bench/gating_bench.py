"""moe_ext.topk_gating on CUDA against torch's own routing, timed in the same run.

    python bench/gating_bench.py                    # the issue's four cases, fp32 logits
    python bench/gating_bench.py --dtype bf16 --iters 500 --json bench/results/gating.json

Cases: T = 16384 and 128 (decode) for E=256 k=8 with 8 groups / 4 chosen, sigmoid scores and an
expert bias (DeepSeek-V3), and E=8 k=2 with softmax (Mixtral). Each case times
  - moe_ext: torch.ops.moe_ext.topk_gating (weights, idx, positions, tokens_per_expert and the
    three losses, all in one op),
  - torch plain: softmax + topk + renormalise (the baseline of ../shared/GPU.md: 237 us for the
    large E=256 case),
  - torch routed (grouped cases): the same routing as moe_ext in plain torch (sigmoid, bias, group
    top-2 sums, group top-k, masked top-k, gather, renormalise): what a model would run instead.
Two times per implementation: 'eager' (CUDA events around one call: includes the host's launch
overhead when the host is the slower side, as in a real eager model) and 'graph' (the same call
captured in a CUDA graph and replayed: GPU time only). L2 is flushed before every timed
iteration unless --no-flush. Medians over --iters iterations.
"""
import argparse
import json
import sys

import torch
from cuda_timer import CudaTimer

import moe_ext  # noqa: F401  (registers torch.ops.moe_ext)

ops = torch.ops.moe_ext

CASES = [
    dict(T=16384, E=256, k=8, groups=(8, 4), score="sigmoid", bias=True),
    dict(T=128, E=256, k=8, groups=(8, 4), score="sigmoid", bias=True),
    dict(T=16384, E=8, k=2, groups=None, score="softmax", bias=False),
    dict(T=128, E=8, k=2, groups=None, score="softmax", bias=False),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_plain(logits, k):
    s = torch.softmax(logits.float(), -1)
    w, idx = torch.topk(s, k, dim=-1)
    return w / w.sum(-1, keepdim=True), idx


def torch_routed(logits, k, score, bias, groups):
    l = logits.float()
    s = torch.sigmoid(l) if score == "sigmoid" else torch.softmax(l, -1)
    sel = s + bias if bias is not None else s
    if groups is not None:
        G, tg = groups
        T, E = sel.shape
        gscore = sel.view(T, G, E // G).topk(2, dim=-1).values.sum(-1)
        gidx = gscore.topk(tg, dim=-1).indices
        mask = torch.zeros(T, G, dtype=torch.bool, device=sel.device).scatter_(1, gidx, True)
        sel = sel.masked_fill(~mask.repeat_interleave(E // G, 1), float("-inf"))
    idx = sel.topk(k, dim=-1).indices
    w = s.gather(1, idx)
    return w / w.sum(-1, keepdim=True), idx


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 between iterations")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        # No GPU (the CPU build machine): a skip, not a failure (as ep_bench.py does).
        print("gating_bench: no CUDA device; skipped")
        return 0

    timer = CudaTimer(args.iters, args.warmup, not args.no_flush)
    dtype = DTYPES[args.dtype]
    dev = torch.cuda.get_device_name()
    print(f"# gating_bench: {dev}, torch {torch.__version__}, logits {args.dtype}, "
          f"median of {args.iters} iterations, L2 {'warm' if args.no_flush else 'flushed'}")
    print(f"# {'case':<34} {'impl':<14} {'eager us':>9} {'graph us':>9} {'vs torch plain':>15}")
    rows = []
    torch.manual_seed(0)
    for c in CASES:
        T, E, k, groups = c["T"], c["E"], c["k"], c["groups"]
        logits = torch.randn(T, E, device="cuda").to(dtype)
        bias = (torch.randn(E, device="cuda") * 0.05) if c["bias"] else None
        G, tg = groups if groups else (0, 0)
        impls = {
            "moe_ext": lambda: ops.topk_gating(logits, k, c["score"], True, bias, G, tg, 0.0, None, 0),
            "torch plain": lambda: torch_plain(logits, k),
        }
        if groups or c["score"] != "softmax":
            impls["torch routed"] = lambda: torch_routed(logits, k, c["score"], bias, groups)
        name = f"T={T} E={E} k={k}" + (f" g={G}/{tg}" if groups else "") + f" {c['score']}"
        times = {n: (timer.eager(fn)[0], timer.graph(fn)[0]) for n, fn in impls.items()}
        base = times["torch plain"][1]
        for n, (eager, graph) in times.items():
            print(f"  {name:<34} {n:<14} {eager:9.2f} {graph:9.2f} {base / graph:14.1f}x")
            rows.append(dict(case=name, impl=n, eager_us=eager, graph_us=graph, speedup_vs_torch_plain=base / graph,
                             T=T, E=E, k=k, groups=list(groups) if groups else None, score=c["score"],
                             dtype=args.dtype, device=dev))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(benchmark="gating_bench", device=dev, torch=torch.__version__, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
