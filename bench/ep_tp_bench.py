"""EP x TP: the two ways to bring a token to every TP shard of its expert, timed in the same run.

    python bench/ep_tp_bench.py --ep 2 --tp 2                      # CPU, gloo (what CI can run)
    python bench/ep_tp_bench.py --ep 2 --tp 2 --device cuda        # ranks sharing one GPU (ipc; run MPS)

W = ep * tp spawned ranks, TP innermost (moe_ext.parallel.make_groups). Expert e lives on EP
index e // (E / ep); its w1 is split by columns and its w2 by rows over that index's TP group.
  gather  (what moe_ext.MoE does): dispatch within the EP group, all-gather the received rows
          inside the TP group, every shard runs on all of them, reduce-scatter the partial
          outputs (float32, TP-rank order), combine within EP.
  direct  dispatch once over all W ranks to every shard: slot (t, j) becomes tp slots, one per
          TP rank of its expert's group (virtual expert (EP index * tp + TP rank) * E/ep + local
          expert); each rank runs its shard on the rows it received; combine sums the tp * k
          partial rows of each token with the routing weights.
Both compute the same function (checked against each other before timing). Rows moved per
forward (the backward mirrors them), with D the (token, destination EP index) pairs and R >= D the
(token, expert) slots they expand into:
  gather: dispatch D, all-gather + reduce-scatter 2 (tp - 1) R inside the TP groups, combine R;
  direct: dispatch tp D and combine tp R, all through dispatch / combine.
So direct moves (tp - 1)(R - D) rows fewer in all (tokens with several experts on one EP index
are expanded before the TP all-gather), while gather keeps all but D + R of its rows inside the
TP group: NVLink when TP is inside a node, where EP may cross the network. Printed: the median
forward + backward time of each (slowest rank) and the rows summed over the ranks.
On CUDA both variants move every row with the ipc backend (since session 9 the TP all-gather and
reduce-scatter are a dispatch / combine over the TP group too; before, they went through the gloo
group's collectives, staging the rows through the host, and the one GPU figure of session 8,
gather 700.8 ms against direct 47.3 ms, compared transports more than row counts).
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from spawn_ranks import run_ranks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512, help="each expert's ffn hidden (split over TP)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _experts(w1, w2):
    import moe_ext

    def run(x, counts):
        h = moe_ext.grouped_gemm(x, w1, counts, activation="swiglu")
        return moe_ext.grouped_gemm(h, w2, counts)
    return run


def _gather(x, idx, w, w1, w2, E, ep_group, tp_group, tp_rank):
    import moe_ext
    from moe_ext import parallel as par

    recv, tpe, handle = moe_ext.dispatch(x, idx, w, E, group=ep_group)
    y, _ = par.tp_experts(recv, tpe, _experts(w1, w2), tp_rank, tp_group)
    return moe_ext.combine(y, handle), int(recv.shape[0])


def _pairs(idx, E, ep):
    """(token, destination EP index) pairs of idx: the rows a dispatch within EP sends."""
    dest = torch.where(idx >= 0, idx // (E // ep), -1)
    hit = torch.zeros(idx.shape[0], ep + 1, dtype=torch.bool, device=idx.device)
    hit.scatter_(1, torch.where(dest >= 0, dest, ep), True)
    return int(hit[:, :ep].sum())


def _direct(x, idx, w, w1, w2, E, ep, tp):
    import moe_ext
    from moe_ext.parallel import direct_tp_slots

    virtual, wv = direct_tp_slots(idx, w, E // ep, tp)
    recv, tpe, handle = moe_ext.dispatch(x, virtual, wv, E * tp, group=dist.group.WORLD)
    return moe_ext.combine(_experts(w1, w2)(recv, tpe), handle), int(recv.shape[0])


def _rank(rank, args, store, results):
    import moe_ext  # noqa: F401
    from moe_ext.parallel import make_groups

    W = args.ep * args.tp
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // W))
    device = torch.device(args.device if args.device == "cpu" else "cuda:0")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=W,
                            timeout=datetime.timedelta(seconds=120))
    try:
        ep_group, tp_group = make_groups(args.ep, args.tp)
        tp_rank, ep_rank = rank % args.tp, rank // args.tp
        E, H, F, k, T = args.experts, args.hidden, args.ffn, args.k, args.tokens
        El, f = E // args.ep, F // args.tp
        g = torch.Generator().manual_seed(7)  # the logical weights, the same on every rank
        w1_all = torch.randn(E, H, 2 * F, generator=g) / H ** 0.5
        w2_all = torch.randn(E, F, H, generator=g) / F ** 0.5
        mine = slice(ep_rank * El, (ep_rank + 1) * El)
        cols = torch.cat([torch.arange(tp_rank * f, (tp_rank + 1) * f), F + torch.arange(tp_rank * f, (tp_rank + 1) * f)])
        w1 = w1_all[mine][:, :, cols].to(device, dtype).requires_grad_()
        w2 = w2_all[mine][:, tp_rank * f:(tp_rank + 1) * f].contiguous().to(device, dtype).requires_grad_()
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(T, H, generator=g).to(device, dtype).requires_grad_()
        idx = torch.rand(T, E, generator=g).topk(k, dim=1).indices.to(device)
        wt = torch.rand(T, k, generator=g).to(device)
        gout = torch.randn(T, H, generator=g).to(device, dtype)

        variants = {"gather": lambda: _gather(x, idx, wt, w1, w2, E, ep_group, tp_group, tp_rank),
                    "direct": lambda: _direct(x, idx, wt, w1, w2, E, args.ep, args.tp)}
        outs, grads, rows = {}, {}, {}
        for name, fn in variants.items():
            out, rows[name] = fn()
            outs[name] = out.detach().float()
            grads[name] = [t.float() for t in torch.autograd.grad((out.float() * gout.float()).sum(), [x, w1, w2])]
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(outs["direct"], outs["gather"], **tol)
        for a, b in zip(grads["direct"], grads["gather"]):
            torch.testing.assert_close(a, b, **tol)

        times = {}
        for name, fn in variants.items():
            samples = []
            for i in range(args.warmup + args.iters):
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out, _ = fn()
                torch.autograd.grad((out.float() * gout.float()).sum(), [x, w1, w2])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    samples.append(time.perf_counter() - t0)
            times[name] = statistics.median(samples)
        D, tp = _pairs(idx, E, args.ep), args.tp
        moved = {"gather": (D, 2 * (tp - 1) * rows["gather"], rows["gather"]),
                 "direct": (tp * D, 0, rows["direct"])}
        results.put((rank, times, moved))
    finally:
        dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    W = args.ep * args.tp
    if args.experts % args.ep or args.ffn % args.tp or args.k > args.experts:
        sys.exit("ep_tp_bench: --experts must be a multiple of --ep, --ffn of --tp, and --k <= --experts")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("ep_tp_bench: no CUDA device; nothing to do")
        return 0
    got, exitcodes = run_ranks(_rank, args, W)
    if len(got) < W or any(exitcodes):
        sys.exit(f"ep_tp_bench: a rank failed (exit codes {exitcodes})")
    slowest = {name: max(t[name] for _, t, _ in got) for name in ("gather", "direct")}
    rows = {name: [sum(m[name][i] for _, _, m in got) for i in range(3)] for name in ("gather", "direct")}
    print(f"# EP {args.ep} x TP {args.tp} on {args.device}: T={args.tokens}/rank H={args.hidden} F={args.ffn} "
          f"E={args.experts} k={args.k}; forward + backward, median of {args.iters}, slowest rank; rows of one "
          "forward summed over the ranks")
    print(f"{'variant':8s} {'ms':>9s} {'dispatch rows':>14s} {'TP rows':>10s} {'combine rows':>13s} {'all rows':>10s}")
    for name in ("gather", "direct"):
        d, t, c = rows[name]
        print(f"{name:8s} {slowest[name] * 1e3:9.2f} {d:14d} {t:10d} {c:13d} {d + t + c:10d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), ms={k: v * 1e3 for k, v in slowest.items()}, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
