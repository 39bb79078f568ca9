"""`moe-ext demo`: trains a small MoE model with expert parallelism on synthetic data.

The data: inputs x [T, H] drawn from a mixture of `--clusters` Gaussian clusters with unequal
weights; targets y = teacher(x), a frozen random MoE (plain torch: softmax top-k router, SwiGLU
experts), scaled to unit variance. The structure the experts can specialise on is the teacher's
routing of the clusters.

The student: `--layers` blocks h = h + MoE(RMSNorm(h)) (moe_ext.MoE, experts split over the EP
ranks), then a linear head after a final RMSNorm; MSE loss plus `--aux-coef` times the
load-balancing aux loss and/or the auxiliary-loss-free bias update (`--balance`); Adam.

Expert parallelism over W = `--world` ranks: W > 1 spawns W processes (gloo process group,
rendezvous through a FileStore in a temporary directory); `--world 1` runs in this process. Under
torchrun (`torchrun --nproc-per-node W -m moe_ext demo`, or several nodes) every process is one
rank instead: the process group comes from torchrun's environment and `--world` is ignored. Every
rank draws its own shard of one global batch of W * `--tokens` tokens per step; the router, norms
and head are replicated (their gradients are all-reduced), each rank holds E / W experts. The
model starts from the same weights whatever W is (every global expert is initialised from one
seeded stream).

Printed on rank 0 every `--log-every` steps: loss, aux loss, dropped-slot rate (capacity), tokens/s
over the whole world, the per-expert load (share of routed slots, before capacity drops) of every
layer and its max/mean. Writes `--png` (load balance over time) and `--json` (the curves).

From Python: `run(args)` with W > 1 starts processes with the spawn method, which imports the
caller's main module again in every child; a script calling it needs the usual
`if __name__ == "__main__":` guard (the `moe-ext` command and `python -m moe_ext` are fine).

CUDA: `--device cuda --world 1` trains on one GPU. With W > 1, rank r uses GPU r if there are W
GPUs (under torchrun: its LOCAL_RANK's GPU if the node has one per local rank), else all ranks
share GPU 0; tokens move with the CUDA backends (ipc between GPUs with peer
access or on one GPU, nccl otherwise). Ranks sharing one GPU should run under MPS (see
../shared/GPU.md or bench/README.md): without it their kernels take turns in time slices, which
is correct but slow.
"""
import datetime
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_BALANCE = ("aux", "bias", "both", "none")


def add_arguments(parser):
    """Adds the demo's options to an argparse parser (the CLI owner wires it as a subcommand)."""
    g = parser.add_argument_group("run")
    g.add_argument("--world", type=int, default=2, help="EP ranks (W > 1: spawned gloo processes; 1: in-process)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model trains")
    g.add_argument("--steps", type=int, default=300)
    g.add_argument("--log-every", type=int, default=25, help="print every N steps (rank 0)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=0, help="intra-op threads per rank (0: CPU cores / W)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds a collective waits for a missing rank")
    g.add_argument("--json", default=None, metavar="PATH", help="write the loss / load curves here")
    g.add_argument("--png", default="moe_demo_load.png", metavar="PATH",
                   help="load-balance plot (needs matplotlib); 'none' to skip")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    m = parser.add_argument_group("model and data")
    m.add_argument("--tokens", type=int, default=512, help="tokens per rank per step")
    m.add_argument("--hidden", type=int, default=64)
    m.add_argument("--ffn", type=int, default=128, help="hidden size of each expert's SwiGLU")
    m.add_argument("--experts", type=int, default=8)
    m.add_argument("--topk", type=int, default=2)
    m.add_argument("--layers", type=int, default=2, help="MoE blocks of the student")
    m.add_argument("--capacity-factor", type=float, default=1.25, help="0: no capacity (nothing dropped)")
    m.add_argument("--clusters", type=int, default=16, help="input clusters of the synthetic data")
    t = parser.add_argument_group("training")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--balance", choices=_BALANCE, default="both",
                   help="aux: aux loss; bias: aux-loss-free bias update; both; none")
    t.add_argument("--aux-coef", type=float, default=1e-2)
    t.add_argument("--bias-rate", type=float, default=1e-3, help="bias step per update (--balance bias/both)")
    return parser


# ---- progress ----------------------------------------------------------------------------------

class _Progress:
    """tqdm when it is importable, else a plain bar on stderr; `write` prints above the bar."""

    def __init__(self, total, desc, enabled=True):
        self.total, self.desc, self.n, self.bar = total, desc, 0, None
        # NOTE: a bar only on a terminal: redirected to a file, carriage returns just pile up.
        self.enabled = enabled and sys.stderr.isatty()
        self._last = 0.0
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, n=1):
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (time.monotonic() - self._last > 0.5 or self.n >= self.total):
            self._last = time.monotonic()
            done = int(30 * self.n / max(self.total, 1))
            sys.stderr.write(f"\r{self.desc} [{'#' * done}{'.' * (30 - done)}] {self.n}/{self.total}")
            sys.stderr.flush()

    def write(self, line):
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            if self.enabled:
                sys.stderr.write("\r" + " " * (len(self.desc) + 48) + "\r")
            print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\r" + " " * (len(self.desc) + 48) + "\r")
            sys.stderr.flush()


# ---- teacher, data, student ---------------------------------------------------------------------

class _Teacher:
    """A frozen random MoE in plain torch: y = sum_j w_j * expert_{idx_j}(x), softmax top-k routing
    (renormalised), SwiGLU experts; every expert is evaluated densely (the sizes are small)."""

    def __init__(self, hidden, ffn, num_experts, k, gen, device):
        H, Fh, E = hidden, ffn, num_experts
        self.k = k
        self.router = (torch.randn(H, E, generator=gen) * (3.0 / math.sqrt(H))).to(device)  # sharp routing
        self.w_gate = (torch.randn(E, H, Fh, generator=gen) / math.sqrt(H)).to(device)
        self.w_up = (torch.randn(E, H, Fh, generator=gen) / math.sqrt(H)).to(device)
        self.w_down = (torch.randn(E, Fh, H, generator=gen) / math.sqrt(Fh)).to(device)
        self.scale = 1.0

    @torch.no_grad()
    def __call__(self, x):
        u = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        probs = torch.softmax(u @ self.router, -1)
        w, idx = probs.topk(self.k, -1)
        gates = torch.zeros_like(probs).scatter_(1, idx, w / w.sum(-1, keepdim=True))  # [T, E]
        h = F.silu(torch.einsum("th,ehf->etf", u, self.w_gate)) * torch.einsum("th,ehf->etf", u, self.w_up)
        y = torch.einsum("etf,efh->eth", h, self.w_down)
        return torch.einsum("te,eth->th", gates, y) * self.scale


class _Data:
    """One global batch per step from a seeded generator; each rank takes its shard."""

    def __init__(self, cfg, device):
        gen = torch.Generator().manual_seed(cfg["seed"])
        H, C = cfg["hidden"], cfg["clusters"]
        self.centers = torch.randn(C, H, generator=gen) * 2.0
        self.probs = 1.0 / torch.arange(1, C + 1, dtype=torch.float64) ** 0.8  # unequal cluster weights
        self.probs /= self.probs.sum()
        self.teacher = _Teacher(H, cfg["ffn"], cfg["experts"], cfg["topk"], gen, device)
        self.cfg, self.device = cfg, device
        probe = self._inputs(torch.Generator().manual_seed(cfg["seed"] + 7919), 4096).to(device)
        self.teacher.scale = 1.0 / float(self.teacher(probe).std().clamp_min(1e-6))  # unit-variance targets

    def _inputs(self, gen, n):
        c = torch.multinomial(self.probs, n, replacement=True, generator=gen)
        return self.centers[c] + 0.7 * torch.randn(n, self.centers.shape[1], generator=gen)

    def batch(self, step, rank, world):
        T = self.cfg["tokens"]
        gen = torch.Generator().manual_seed(self.cfg["seed"] * 1_000_003 + 17 + step)
        x = self._inputs(gen, T * world)[rank * T:(rank + 1) * T].to(self.device)
        return x, self.teacher(x)


class Student(nn.Module):
    """`layers` blocks h = h + MoE(RMSNorm(h)), then head(RMSNorm(h))."""

    def __init__(self, cfg, ep_group, device):
        super().__init__()
        from .layer import MoE

        H, E = cfg["hidden"], cfg["experts"]
        cf = cfg["capacity_factor"] or None
        bias = cfg["balance"] in ("bias", "both")
        self.norms = nn.ModuleList(nn.RMSNorm(H, device=device) for _ in range(cfg["layers"]))
        self.moes = nn.ModuleList(MoE(H, cfg["ffn"], E, cfg["topk"], ep_group=ep_group, capacity_factor=cf,
                                      expert_bias=bias, device=device) for _ in range(cfg["layers"]))
        self.out_norm = nn.RMSNorm(H, device=device)
        self.head = nn.Linear(H, H, bias=False, device=device)
        self.routed = []  # per layer: [E] assignments before capacity drops, of the last forward

    @torch.no_grad()
    def init_weights(self, seed):
        """The same model whatever the EP world: every global expert from one seeded stream."""
        gen = torch.Generator().manual_seed(seed + 1)
        for moe in self.moes:
            H, Fh, E = moe.hidden, moe.ffn_hidden, moe.num_experts
            moe.router.weight.copy_(torch.empty(E, H).uniform_(-1, 1, generator=gen) / math.sqrt(H))
            lo, hi = moe.first_local_expert, moe.first_local_expert + moe.num_local_experts
            for e in range(E):
                w1 = torch.empty(H, 2 * Fh).uniform_(-1, 1, generator=gen) / math.sqrt(H)
                w2 = torch.empty(Fh, H).uniform_(-1, 1, generator=gen) / math.sqrt(Fh)
                if lo <= e < hi:
                    moe.w1[e - lo].copy_(w1)
                    moe.w2[e - lo].copy_(w2)
        self.head.weight.zero_()  # the first prediction is 0: loss starts at the targets' variance (1)

    def replicated_parameters(self):
        """Parameters every rank holds a full copy of (their gradients are all-reduced)."""
        experts = {id(m.w1) for m in self.moes} | {id(m.w2) for m in self.moes}
        return [p for p in self.parameters() if id(p) not in experts]

    def forward(self, x):
        from .routing import topk_gating

        h = x
        self.routed = []
        for norm, moe in zip(self.norms, self.moes):
            u = norm(h)
            h = h + moe(u)
            with torch.no_grad():  # the load the router asks for, before capacity drops (for the report)
                logits = F.linear(u.float(), moe.router.weight.float())
                routing = {k: v for k, v in moe.routing.items() if k != "capacity_factor"}
                _, _, st = topk_gating(logits, moe.k, expert_bias=moe.expert_bias, **routing)
                self.routed.append(st.tokens_per_expert)
        return self.head(self.out_norm(h))


# ---- training ----------------------------------------------------------------------------------

def _fmt_rate(r):
    return f"{r / 1e6:.2f}M" if r >= 1e6 else f"{r / 1e3:.1f}k"


def _load_str(frac):
    """Per-expert load shares in percent: a list for up to 16 experts, a sparkline beyond."""
    E = len(frac)
    if E <= 16:
        return "[" + " ".join(f"{100 * f:2.0f}" for f in frac) + "]"
    bars = " ▁▂▃▄▅▆▇█"
    top = max(max(frac), 1e-12)
    return "[" + "".join(bars[min(8, int(round(8 * f / top)))] for f in frac) + "]"


def _train(rank, world, cfg, group, device):
    """The training loop on one rank; returns the history (meaningful on rank 0)."""
    torch.manual_seed(cfg["seed"] + rank)
    data = _Data(cfg, device)
    model = Student(cfg, group, device)
    model.init_weights(cfg["seed"])
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    replicated = model.replicated_parameters()
    L, E, T, k = cfg["layers"], cfg["experts"], cfg["tokens"], cfg["topk"]
    use_aux = cfg["balance"] in ("aux", "both")
    use_bias = cfg["balance"] in ("bias", "both")
    steps, log_every = cfg["steps"], max(1, cfg["log_every"])
    lead = rank == 0
    hist = dict(loss=[], aux_loss=[], drop_rate=[], load=[], max_over_mean=[], tokens_per_s=[])
    progress = _Progress(steps, "train", enabled=lead and not cfg["no_progress"])
    if lead:
        n_local = sum(p.numel() for p in model.parameters())
        progress.write(f"moe-ext demo: {L} x MoE(hidden={cfg['hidden']}, ffn={cfg['ffn']}, experts={E}, top-{k}) + "
                       f"head, {world} EP rank(s) on {device} ({E // world} experts each, {n_local / 1e3:.0f}k "
                       f"parameters per rank), {T * world} tokens/step, capacity factor "
                       f"{cfg['capacity_factor'] or 'none'}, balance={cfg['balance']}, {steps} steps")

    def sync(t):
        """Sums a CPU tensor over the ranks (gloo)."""
        if world > 1:
            dist.all_reduce(t, group=group)
        return t

    t_start = t_last = time.perf_counter()
    last_step = 0
    try:
        for step in range(1, steps + 1):
            x, y = data.batch(step, rank, world)
            out = model(x)
            mse = F.mse_loss(out, y)
            aux = sum(m.stats.aux_loss for m in model.moes) / L
            loss = mse + cfg["aux_coef"] * aux if use_aux else mse
            opt.zero_grad(set_to_none=False)
            (loss / world).backward()  # the gradient of the mean over ranks; expert grads are summed by combine
            if world > 1:  # replicated parameters: sum their gradients over the ranks (on the CPU, for gloo)
                for p in replicated:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                flat = sync(torch.cat([p.grad.reshape(-1) for p in replicated]).cpu())
                off = 0
                for p in replicated:
                    p.grad.copy_(flat[off:off + p.numel()].view_as(p))
                    off += p.numel()
            opt.step()
            if use_bias:
                for m in model.moes:
                    m.update_expert_bias(cfg["bias_rate"])

            # One all-reduce of the step's statistics: [mse, aux, kept slots per layer, routed per layer x E].
            kept = torch.stack([m.stats.tokens_per_expert.sum() for m in model.moes])
            stats = sync(torch.cat([t.detach().double().reshape(-1).cpu()
                                    for t in (mse, aux, kept, torch.stack(model.routed))]))
            mse_g, aux_g = float(stats[0]) / world, float(stats[1]) / world
            drop = 1.0 - float(stats[2:2 + L].sum()) / (L * T * world * k)
            routed = stats[2 + L:].view(L, E)
            frac = routed / routed.sum(1, keepdim=True).clamp_min(1)
            hist["loss"].append(mse_g)
            hist["aux_loss"].append(aux_g)
            hist["drop_rate"].append(drop)
            hist["load"].append(frac.tolist())
            hist["max_over_mean"].append((frac.max(1).values * E).tolist())
            progress.update()
            if lead and (step % log_every == 0 or step == 1 or step == steps):
                now = time.perf_counter()
                rate = (step - last_step) * T * world / max(now - t_last, 1e-9)
                t_last, last_step = now, step
                hist["tokens_per_s"].append([step, rate])
                loads = "  ".join(f"L{i} {_load_str(frac[i].tolist())} max/mean {float(frac[i].max()) * E:.2f}"
                                  for i in range(L))
                progress.write(f"step {step:5d}  loss {mse_g:.4f}  aux {aux_g:.3f}  drop {100 * drop:4.1f}%  "
                               f"{_fmt_rate(rate)} tok/s  load% {loads}")
    finally:
        progress.close()
    hist["seconds"] = time.perf_counter() - t_start
    hist["tokens_per_s_mean"] = steps * T * world / max(hist["seconds"], 1e-9)
    return hist


# ---- output ------------------------------------------------------------------------------------

def _mean(xs):
    return sum(xs) / max(len(xs), 1)


def _summary(hist, cfg):
    n = max(1, min(10, len(hist["loss"]) // 4))
    L = cfg["layers"]
    first = [_mean([m[i] for m in hist["max_over_mean"][:n]]) for i in range(L)]
    last = [_mean([m[i] for m in hist["max_over_mean"][-n:]]) for i in range(L)]
    return dict(loss_first=_mean(hist["loss"][:n]), loss_last=_mean(hist["loss"][-n:]),
                max_over_mean_first=first, max_over_mean_last=last,
                drop_first=_mean(hist["drop_rate"][:n]), drop_last=_mean(hist["drop_rate"][-n:]), window=n)


def _plot(hist, cfg, path):
    """Heatmap of every layer's per-expert load share per step, max/mean load and loss curves."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(f"moe-ext demo: matplotlib is not installed, no plot written to {path} "
              "(pip install matplotlib)", file=sys.stderr)
        return False
    L, E = cfg["layers"], cfg["experts"]
    load = torch.tensor(hist["load"])  # [steps, L, E]
    steps = load.shape[0]
    fig = Figure(figsize=(10, 2.2 * L + 4.5), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(L + 2, 1, gridspec_kw=dict(height_ratios=[1.2] * L + [1, 1]))
    vmax = float(load.max()) if load.numel() else 1.0
    for i in range(L):
        ax = axes[i]
        im = ax.imshow(load[:, i, :].T.numpy(), aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=vmax,
                       extent=(0.5, steps + 0.5, -0.5, E - 0.5), interpolation="nearest")
        ax.set_ylabel(f"layer {i}\nexpert")
        ax.set_title(f"layer {i}: share of routed slots per expert (balanced = {1 / E:.3f})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    ax = axes[L]
    mm = torch.tensor(hist["max_over_mean"])
    for i in range(L):
        ax.plot(range(1, steps + 1), mm[:, i].numpy(), label=f"layer {i}", lw=1)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("max / mean load")
    ax.legend(fontsize=8, loc="upper right")
    ax = axes[L + 1]
    ax.plot(range(1, steps + 1), hist["loss"], lw=1, label="MSE loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(range(1, steps + 1), [100 * d for d in hist["drop_rate"]], lw=0.8, color="tab:red", label="dropped %")
    ax2.set_ylabel("dropped slots %", color="tab:red")
    for a in axes:
        a.set_xlim(0.5, steps + 0.5)
    fig.suptitle(f"moe-ext demo: {cfg['world']} EP rank(s), {E} experts top-{cfg['topk']}, "
                 f"balance={cfg['balance']}", fontsize=10)
    fig.savefig(path, dpi=110)
    return True


def _report(hist, cfg, device):
    s = _summary(hist, cfg)
    mm = ", ".join(f"L{i} {a:.2f} -> {b:.2f}" for i, (a, b) in
                   enumerate(zip(s["max_over_mean_first"], s["max_over_mean_last"])))
    print(f"done: {cfg['steps']} steps in {hist['seconds']:.1f} s ({_fmt_rate(hist['tokens_per_s_mean'])} tokens/s); "
          f"loss {s['loss_first']:.4f} -> {s['loss_last']:.4f} (mean of the first / last {s['window']} steps); "
          f"max/mean load {mm}; dropped {100 * s['drop_first']:.1f}% -> {100 * s['drop_last']:.1f}%")
    if cfg["json"]:
        doc = dict(config={k: v for k, v in cfg.items()}, device=str(device), torch=torch.__version__,
                   summary=s, steps=list(range(1, len(hist["loss"]) + 1)), **hist)
        with open(cfg["json"], "w") as f:
            json.dump(doc, f)
        print(f"wrote {cfg['json']}")
    if cfg["png"] and cfg["png"].lower() != "none":
        if _plot(hist, cfg, cfg["png"]):
            print(f"wrote {cfg['png']}")


# ---- processes ---------------------------------------------------------------------------------

def _rank_device(device_str, local_rank, local_world):
    """This rank's device: GPU local_rank when every local rank has one, else GPU 0 (shared)."""
    device = torch.device(device_str)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if torch.cuda.device_count() >= local_world else 0)
        torch.cuda.set_device(device)
    return device


def _train_in_group(rank, world, cfg, device, init=None):
    """_train on one rank of a gloo process group made with `init` (init_process_group's rendezvous
    arguments; None under torchrun, whose environment has them)."""
    torch.set_num_threads(cfg["threads"])
    # NOTE: gloo for the CPU side (statistics, bootstrap); a CUDA EP backend brings its own transport.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=cfg["timeout"]), **(init or {}))
    try:
        hist = _train(rank, world, cfg, dist.group.WORLD, device)
        # NOTE: nothing that holds the group (layers, autograd graphs) may outlive it: a gloo group
        # destroyed at interpreter exit can abort the process. Free them, then agree to stop.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return hist


def _launched():
    """(rank, world, local_rank, local_world) when torchrun (or another launcher setting its
    environment variables) started this process as one rank of several, else None."""
    env = os.environ
    if "LOCAL_RANK" not in env or "RANK" not in env or int(env.get("WORLD_SIZE", "1")) < 2:
        return None
    world = int(env["WORLD_SIZE"])
    return int(env["RANK"]), world, int(env["LOCAL_RANK"]), int(env.get("LOCAL_WORLD_SIZE", world))


def _worker(rank, world, cfg, store_file, result_file, device_str):
    """One spawned rank: process group, training, history to result_file (rank 0)."""
    try:
        device = _rank_device(device_str, rank, world)
        hist = _train_in_group(rank, world, cfg, device,
                               dict(init_method=f"file://{store_file}", rank=rank, world_size=world))
        if rank == 0:
            with open(result_file, "w") as f:
                json.dump(hist, f)
    except BaseException:
        sys.stderr.write(f"moe-ext demo: rank {rank} failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(1)


def _spawn(cfg, world, device):
    from multiprocessing.connection import wait

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="moe_ext_demo_")
    store, result = os.path.join(tmp, "store"), os.path.join(tmp, "history.json")
    procs = [ctx.Process(target=_worker, args=(r, world, cfg, store, result, str(device)), daemon=True)
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs):
                break  # the peers of a failed rank would wait for it until the timeout: stop them now
            wait([p.sentinel for p in procs if p.is_alive()], timeout=1.0)
        failed = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode not in (None, 0)}
        for p in procs:
            if p.is_alive() and failed:
                p.kill()
            p.join()
        if failed:
            print(f"moe-ext demo: rank(s) {sorted(failed)} failed (exit codes {list(failed.values())}), the other "
                  "ranks were stopped; see the messages above", file=sys.stderr)
            return None
        if any(p.exitcode != 0 for p in procs):  # NOTE: a rank that failed while the others were joined
            print(f"moe-ext demo: exit codes {[p.exitcode for p in procs]}; see the messages above", file=sys.stderr)
            return None
        with open(result) as f:
            return json.load(f)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(tmp, ignore_errors=True)


def _cuda_multirank_problem(world):
    """Why W ranks with CUDA tensors cannot dispatch (None when this build can)."""
    from . import _ipc

    try:
        _ipc.require_cuda_build()
    except RuntimeError as e:
        return str(e)
    return None


def argument_problems(args):
    """What is wrong with the parsed arguments (messages; empty when nothing), before any work."""
    return _config(args)[2]


def _config(args):
    cfg = {k: v for k, v in vars(args).items() if isinstance(v, (bool, int, float, str, type(None)))}
    launched = _launched()
    if launched:
        cfg["world"] = launched[1]
    world = cfg["world"]
    problems = []
    if world < 1:
        problems.append(f"--world must be >= 1, got {world}")
    elif cfg["experts"] % world:
        what = f"the {world} ranks torchrun started" if launched else f"--world {world}"
        problems.append(f"--experts {cfg['experts']} must be a multiple of {what}")
    if not 1 <= cfg["topk"] <= cfg["experts"]:
        problems.append(f"--topk must be in [1, --experts], got {cfg['topk']}")
    for name in ("steps", "tokens", "hidden", "ffn", "layers", "clusters"):
        if cfg[name] < 1:
            problems.append(f"--{name} must be >= 1, got {cfg[name]}")
    if torch.device(cfg["device"]).type == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda, but torch sees no CUDA device")
    return cfg, launched, problems


def run(args):
    """Runs the demo from parsed arguments; returns the exit status."""
    cfg, launched, problems = _config(args)
    world = cfg["world"]
    if problems:
        for p in problems:
            print(f"moe-ext demo: {p}", file=sys.stderr)
        return 2
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        if world > 1:
            why = _cuda_multirank_problem(world)
            if why:
                print(f"moe-ext demo: {world} EP ranks on CUDA need the ipc/nccl dispatch backends, which this "
                      f"build lacks ({why}).\nRun --device cuda --world 1, or --device cpu with --world {world} "
                      "(gloo).", file=sys.stderr)
                return 2
            local_world = launched[3] if launched else world
            if torch.cuda.device_count() < local_world and not os.environ.get("CUDA_MPS_PIPE_DIRECTORY"):
                print(f"moe-ext demo: note: {world} ranks share GPU 0 without MPS (CUDA_MPS_PIPE_DIRECTORY is not "
                      "set): their kernels take turns in time slices, so this is correct but slow", file=sys.stderr)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    if not cfg["threads"]:
        cfg["threads"] = max(1, cores // (launched[3] if launched else world))
    if launched:
        rank, _, local_rank, local_world = launched
        hist = _train_in_group(rank, world, cfg, _rank_device(cfg["device"], local_rank, local_world))
        if rank != 0:
            return 0  # rank 0 reports
    elif world == 1:
        hist = _train(0, 1, cfg, None, device)
    else:
        hist = _spawn(cfg, world, device)
        if hist is None:
            return 1
    _report(hist, cfg, device)
    return 0


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="moe-ext demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
