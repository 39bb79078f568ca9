"""Multi-rank dispatch / combine (the ipc or nccl backend) from Python: W processes, one GPU or one each.

    # all ranks on one GPU: start MPS first (GPU.md), else kernels of different processes
    # take turns in time slices and the numbers mean nothing
    python bench/ep_bench.py --ranks 8 --tokens 4096 --hidden 7168 --k 8 --experts 256
    python bench/ep_bench.py --ranks 2 --tokens 128 --masked          # decode, no-sync layout
    python bench/ep_bench.py --ranks 8 --one-gpu-per-rank --backend nccl   # NCCL: a GPU per rank

Each rank routes its tokens to k distinct random experts (seeded per rank), then times dispatch
and combine with CUDA events (median of --iters, every iteration started together after a gloo
barrier; the reported time is the slowest rank's median). Bytes counted, per rank, summed over
ranks: dispatch moves one row per (token, destination rank) pair, combine one row per kept
(token, slot), or with --partial one per (token, destination rank) pair too. All ranks on one GPU share its HBM, so each row is read and written there once:
"busbw" = 2 x bytes / time, compared with the 2.95 TB/s copy ceiling of GPU.md ("%ceil"). In the
same run, rank 0 times the baseline a single process would need to move the same rows on the
same GPU: torch index_select of them (one read + one write each). --profile N lists rank 0's
kernels over N more calls (bench/profile_kernels.py's table). --grow-to N sizes the buffer for N
tokens first (a decode step after a long prefill: the kernels must not pay for the empty slots).
Results are checked against the gloo backend on CPU before timing (--no-check skips).
"""
import argparse
import datetime
import json
import statistics
import sys

import torch
import torch.distributed as dist
from spawn_ranks import run_ranks

CEIL_BPS = 2.95e12


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--masked", action="store_true", help="no-sync masked layout (decode)")
    p.add_argument("--partial", action="store_true",
                   help="dispatch(partial_combine=True): combine sends one row per (token, rank), not per slot")
    p.add_argument("--num-sms", type=int, default=0, help="blocks of the data kernels (0: every SM)")
    p.add_argument("--grow-to", type=int, default=0, metavar="N",
                   help="first one dispatch + combine of N tokens per rank, so that the buffer is sized for N "
                        "(a decode step after a long prefill), then the timed calls of --tokens")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--one-gpu-per-rank", action="store_true")
    p.add_argument("--backend", default="ipc", choices=("ipc", "nccl"),
                   help="nccl needs --one-gpu-per-rank (NCCL refuses two ranks on one GPU)")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timings, N dispatch + combine calls under torch.profiler on every rank; rank 0 "
                        "prints its kernels (which of send, wait, expand, send-back, sum the time goes to)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _inputs(args, rank, device):
    g = torch.Generator().manual_seed(1234 + rank)
    T, E = args.tokens, args.experts
    x = torch.randn(T, args.hidden, generator=g).to(getattr(torch, args.dtype))
    idx = torch.rand(T, E, generator=g).topk(args.k, dim=1).indices
    w = torch.rand(T, args.k, generator=g)
    return x, idx, w


def _time(fn, args, device):
    times = []
    for i in range(args.warmup + args.iters):
        dist.barrier()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _rank(rank, args, store, results):
    import moe_ext

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.ranks,
                            timeout=datetime.timedelta(seconds=120))
    device = torch.device("cuda", rank if args.one_gpu_per_rank else 0)
    torch.cuda.set_device(device)
    W, E = args.ranks, args.experts
    x, idx, w = _inputs(args, rank, device)
    xd, idxd, wd = x.to(device), idx.to(device), w.to(device)
    kw = dict(sync=False, max_tokens=args.tokens) if args.masked else {}
    kw["partial_combine"] = args.partial
    comm = moe_ext.communicator(device=device, backend=args.backend)
    if args.backend == "ipc":
        comm.num_sms = args.num_sms
    if args.grow_to > args.tokens:
        g = torch.Generator().manual_seed(99 + rank)
        gx = torch.randn(args.grow_to, args.hidden, generator=g).to(x.dtype).to(device)
        gidx = torch.rand(args.grow_to, E, generator=g).topk(args.k, dim=1).indices.to(device)
        gw = torch.rand(args.grow_to, args.k, generator=g).to(device)
        grow_kw = dict(kw, max_tokens=args.grow_to) if args.masked else kw
        recv, _, h = moe_ext.dispatch(gx, gidx, gw, E, backend=args.backend, **grow_kw)
        moe_ext.combine(recv, h)
        torch.cuda.synchronize(device)
    wrong = 0
    if not args.no_check:
        recv, tpe, h = moe_ext.dispatch(xd, idxd, wd, E, backend=args.backend, **kw)
        ref, _, hr = moe_ext.dispatch(x, idx, w, E, backend="gloo", **kw)
        got_rows, ref_rows = recv.cpu(), ref
        if args.masked:  # NOTE: the rows past each expert's count are unwritten by ipc: compare the rest
            keep = torch.arange(ref.shape[1])[None, :] < tpe.cpu().long()[:, None]
            got_rows, ref_rows = got_rows[keep], ref_rows[keep]
        wrong += int((got_rows != ref_rows).reshape(-1, args.hidden).any(1).sum())
        out = moe_ext.combine(recv, h)
        out_ref = moe_ext.combine(ref, hr)
        wrong += int((out.cpu() != out_ref).any(1).sum())
    state = {}

    def do_dispatch():
        state["recv"], _, state["h"] = moe_ext.dispatch(xd, idxd, wd, E, backend=args.backend, **kw)

    def do_combine():
        moe_ext.combine(state["recv"], state["h"])

    t_dispatch = _time(do_dispatch, args, device)
    do_dispatch()
    t_combine = _time(do_combine, args, device)
    # Rows this rank moves: one per (token, destination) pair; one per kept (token, slot) back.
    owner = idx // (E // W)
    pairs = int(sum((owner == d).any(1).sum() for d in range(W)))
    slots = int((idx >= 0).sum())
    row = args.hidden * x.element_size()
    base = None
    if rank == 0:
        rows = torch.randint(0, args.tokens, (pairs,), device=device)
        base = _time_local(lambda: xd.index_select(0, rows), device, args)
    kernels = None
    if args.profile > 0:
        from profile_kernels import kernel_table

        def both():
            do_dispatch()
            do_combine()

        dist.barrier()
        kernels = kernel_table(both, args.profile, 1, True)
    results.put((rank, dict(dispatch_us=t_dispatch, combine_us=t_combine, dispatch_bytes=pairs * row,
                            combine_bytes=(pairs if args.partial else slots) * row, wrong=wrong, baseline_us=base, nbytes=comm.nbytes,
                            kernels=kernels)))
    dist.barrier()
    comm.close()
    dist.destroy_process_group()


def _time_local(fn, device, args):
    for _ in range(args.warmup):
        fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(args.iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize(device)
        times.append(s.elapsed_time(e) * 1e3)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    if args.backend == "nccl" and not args.one_gpu_per_rank:
        print("ep_bench: --backend nccl needs --one-gpu-per-rank (NCCL refuses two ranks on one GPU)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("ep_bench: no CUDA device; skipped")
        return 0
    got = dict(run_ranks(_rank, args, args.ranks, poll_s=5)[0])
    if len(got) < args.ranks:
        print(f"ep_bench: only {len(got)} of {args.ranks} ranks reported", file=sys.stderr)
        return 1
    rows = [got[r] for r in range(args.ranks)]
    out = {"ranks": args.ranks, "tokens": args.tokens, "hidden": args.hidden, "k": args.k, "experts": args.experts,
           "dtype": args.dtype, "masked": args.masked, "partial": args.partial, "backend": args.backend, "device": torch.cuda.get_device_name(0)}
    print(f"backend {args.backend}, {args.ranks} ranks on {'one GPU each' if args.one_gpu_per_rank else 'one GPU'}")
    print(f"{'stage':>9} {'ranks':>5} {'tok/rank':>8} {'hidden':>6} {'k':>3} {'E':>4} {'time us':>9} "
          f"{'bytes':>12} {'busbw GB/s':>10} {'%ceil':>6} {'#wrong':>6}")
    for stage in ("dispatch", "combine"):
        t = max(r[f"{stage}_us"] for r in rows)
        moved = sum(r[f"{stage}_bytes"] for r in rows)
        bw = 2 * moved / (t * 1e-6)
        out[stage] = dict(us=t, bytes=moved, busbw=bw, frac=bw / CEIL_BPS, floor_us=2 * moved / CEIL_BPS * 1e6,
                          per_rank_us=[r[f"{stage}_us"] for r in rows])
        print(f"{stage:>9} {args.ranks:>5} {args.tokens:>8} {args.hidden:>6} {args.k:>3} {args.experts:>4} "
              f"{t:>9.1f} {moved:>12} {bw / 1e9:>10.1f} {100 * bw / CEIL_BPS:>5.1f}% {sum(r['wrong'] for r in rows):>6}")
    out["baseline_index_select_us_rank0"] = rows[0]["baseline_us"]
    out["buffer_bytes_per_rank"] = rows[0]["nbytes"]
    print(f"baseline (rank 0 alone, torch index_select of its dispatch rows): {rows[0]['baseline_us']:.1f} us; "
          f"buffer {rows[0]['nbytes'] / 2**20:.0f} MiB per rank")
    print(f"per-rank medians (us): dispatch {[round(r['dispatch_us']) for r in rows]}, "
          f"combine {[round(r['combine_us']) for r in rows]}")
    if rows[0]["kernels"] is not None:
        total = sum(t for _, _, t in rows[0]["kernels"])
        print(f"rank 0 kernels per dispatch + combine ({args.profile} calls profiled): {total:.1f} us of GPU time")
        for name, calls, t in rows[0]["kernels"][:15]:
            print(f"  {100 * t / total:5.1f}% {t:9.1f} us {calls:5.1f} calls  {name[:100]}")
        out["rank0_kernels"] = [dict(name=n, calls=c, us=t) for n, c, t in rows[0]["kernels"]]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if all(r["wrong"] == 0 for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
