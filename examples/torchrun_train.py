"""Training one moe_ext.MoE layer with expert parallelism under torchrun: a template to copy.

    torchrun --nproc-per-node 4 examples/torchrun_train.py                 # CPU (gloo): EP over 4 ranks
    torchrun --nproc-per-node 4 examples/torchrun_train.py --tp 2          # EP 2 x expert TP 2
    torchrun --nproc-per-node 8 examples/torchrun_train.py --device cuda   # one GPU per rank
    torchrun --nnodes 2 --nproc-per-node 8 ... examples/torchrun_train.py --device cuda   # two nodes

Every rank trains on its own tokens (data parallel). The experts are split over the EP ranks and
their gradients arrive complete through combine's backward; the router is replicated, so its
gradient is averaged over all ranks (what DDP would do for the dense part of a model). The layer
picks the transport itself: gloo for CPU tensors; for CUDA tensors ipc between GPUs with peer
access (or ranks sharing one GPU; run those under MPS), nccl otherwise. `moe_ext.describe()` says
which and why. At the end the script checks that the replicated weights are still identical on
every rank.
"""
import argparse
import gc
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import moe_ext
from moe_ext.parallel import make_groups


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tp", type=int, default=1, help="expert tensor-parallel ranks per expert (EP = world / tp)")
    ap.add_argument("--chunks", type=int, default=1, help="the layer's EP pipeline chunks (CUDA overlap; tp 1)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if args.device == "cuda":
        # A GPU per local rank; with fewer GPUs the ranks share GPU 0 (ipc between processes).
        device = torch.device("cuda", local_rank if torch.cuda.device_count() >= local_world else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # NOTE: gloo is enough for the bootstrap (the ipc and nccl backends bring their own transport)
    # and works for ranks sharing one GPU, which an nccl process group refuses.
    dist.init_process_group("gloo")
    try:
        train(args, device)
        # NOTE: a gloo worker thread that frees a finished collective's tensors after the interpreter
        # began to exit aborts the process ("terminate called without an active exception"), and
        # once torch.optim has loaded torch._dynamo the group outlives destroy_process_group. So:
        # everything of the training is freed (train returned; gc for cycles), then a barrier, whose
        # wait lets the workers finish, before the group is destroyed.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # NOTE: and the interpreter's own teardown is skipped: even so, a gloo worker thread still alive
    # there aborted a CI run once (rank 0, after the last step; about 1 run in 100). Nothing is
    # left to clean up, so exit at once. (An exception above still exits with its traceback.)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train(args, device):
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % args.tp or args.experts % (world // args.tp):
        raise SystemExit(f"--tp {args.tp} must divide the {world} ranks, and --experts {args.experts} be a multiple "
                         f"of the EP size {world // max(1, args.tp)}")
    ep_group, tp_group = make_groups(world // args.tp, args.tp) if args.tp > 1 else (dist.group.WORLD, None)
    dtype = getattr(torch, args.dtype)

    layer = moe_ext.MoE(args.hidden, args.ffn, args.experts, args.topk, ep_group=ep_group, tp_group=tp_group,
                        expert_bias=True, num_chunks=args.chunks, device=device, dtype=dtype)
    # The same logical model on every rank, whatever the layout: each rank keeps its experts / shards.
    gen = torch.Generator().manual_seed(args.seed)
    H, Fh, E = args.hidden, args.ffn, args.experts
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(E, H, generator=gen) / H ** 0.5)
        w1 = torch.randn(E, H, 2 * Fh, generator=gen) / H ** 0.5
        w2 = torch.randn(E, Fh, H, generator=gen) / Fh ** 0.5
        layer.load_experts(w1.to(device, dtype), w2.to(device, dtype))
    replicated = [p for n, p in layer.named_parameters() if n not in ("w1", "w2")]
    opt = torch.optim.Adam(layer.parameters(), lr=args.lr)
    # A fixed random target function, the same on every rank.
    proj = (torch.randn(H, H, generator=gen) / H ** 0.5).to(device)
    if rank == 0:
        print(f"{world} ranks: EP {world // args.tp} x TP {args.tp}, {E} experts top-{args.topk}, {args.tokens} "
              f"tokens/rank, {dtype} on {device}; dispatch: {moe_ext.describe(ep_group, device)}", flush=True)

    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        g = torch.Generator().manual_seed(args.seed * 100003 + step * 1009 + rank)  # this rank's batch
        x = torch.randn(args.tokens, H, generator=g).to(device, dtype)
        y = torch.tanh(x.float() @ proj)
        out = layer(x)
        loss = F.mse_loss(out.float(), y) + 1e-2 * layer.stats.aux_loss
        opt.zero_grad(set_to_none=False)
        (loss / world).backward()  # the mean over ranks: expert gradients arrive summed through combine
        for p in replicated:  # the dense part: average over every rank, as DDP would (on the CPU, for gloo)
            grad = p.grad.cpu()
            dist.all_reduce(grad)
            p.grad.copy_(grad)
        opt.step()
        layer.update_expert_bias(1e-3)  # auxiliary-loss-free balancing (from the load summed over every rank)
        mean_loss = loss.detach().float().cpu()
        dist.all_reduce(mean_loss)
        if rank == 0 and (step == 1 or step % 10 == 0 or step == args.steps):
            rate = step * args.tokens * world / (time.perf_counter() - t0)
            print(f"step {step:4d}  loss {float(mean_loss) / world:.4f}  {rate / 1e3:.1f}k tokens/s", flush=True)

    # Every rank must still hold the same replicated weights and expert bias.
    for t in replicated + [layer.expert_bias]:
        t = t.detach().cpu().contiguous()
        copies = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(copies, t)
        assert all(torch.equal(c, copies[0]) for c in copies), "replicated weights diverged across ranks"
    if rank == 0:
        print(f"ok: replicated weights and expert bias identical on all {world} ranks after {args.steps} steps",
              flush=True)


if __name__ == "__main__":
    main()
