"""`moe-ext bench`: every stage of an MoE layer against its plain-torch baseline, in the same run.

Stages (ours | baseline):
  gating          moe_ext.topk_gating | softmax + topk + renormalise (ours also computes the
                  counts, aux loss and z-loss)
  permute         moe_ext.permute | argsort(idx, stable) + index_select (+ bincount)
  unpermute       moe_ext.unpermute | index_add_ of the weighted rows into float32 [T, H]
  gemm up / down  moe_ext.grouped_gemm | one torch.mm per expert (host counts); and
                  torch._grouped_mm (its preferred [E, N, K] layout) where this torch has it
  swiglu          moe_ext.gemm.swiglu and its gradient (moe_ext::swiglu_backward), over the
                  up-projection's rows | the same formulas in eager torch (float32)
  dispatch        moe_ext.dispatch at world 1 (no communication) | the permute baseline
  combine         moe_ext.combine at world 1 | the unpermute baseline
  layer fwd+bwd   moe_ext.MoE forward + backward | a plain-torch layer with the same weights
                  (softmax/topk router, per-expert gather + matmul + SwiGLU + index_add_); then
                  the same layer with recompute_activation=True
Multi-rank dispatch/combine are measured when the GPU backends exist (ipc / nccl); this bench
runs one process.

Timing: median over --iters after --warmup calls; on CUDA of CUDA-event pairs around each call,
with L2 evicted (a memset of twice its size) before each timed call; on the CPU of perf_counter.
Work: bytes a stage must move (gating: logits in, weights + ids out; permute / unpermute /
dispatch / combine: T*H + T*k*H elements) or FLOPs (GEMMs: 2*M*K*N; layer: router + 3x the
forward's expert GEMMs). %ceil: achieved rate / the H100 ceilings measured in GPU.md (2.95 TB/s
copy, 764 TFLOP/s dense bf16); n/a on the CPU. max err: max |ours - baseline| / max |baseline|
(exact stages must give 0), checked once per stage before timing.
"""
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

CEIL_GBPS = 2950.0  # GPU.md: device-to-device copy, H100
CEIL_TFLOPS = 764.0  # GPU.md: dense bf16 matmul, H100

# Full shapes on CUDA (GPU.md / issue 8 targets); on the CPU scaled down to finish in well under a minute.
_SHAPES = {
    "mixtral": dict(cuda=dict(tokens=16384, hidden=4096, ffn=14336, experts=8, topk=2),
                    cpu=dict(tokens=1024, hidden=256, ffn=512, experts=8, topk=2)),
    "deepseek-v3": dict(cuda=dict(tokens=16384, hidden=7168, ffn=2048, experts=256, topk=8),
                        cpu=dict(tokens=512, hidden=256, ffn=128, experts=64, topk=8)),
    "custom": dict(cuda=dict(tokens=4096, hidden=1024, ffn=2048, experts=16, topk=2),
                   cpu=dict(tokens=256, hidden=128, ffn=256, experts=8, topk=2)),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}

STAGES = ("gating", "permute", "unpermute", "gemm up", "gemm down", "swiglu", "dispatch", "combine",
          "layer fwd+bwd")


def add_arguments(parser):
    """Adds the bench's options to an argparse parser (the CLI owner wires it as a subcommand)."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    parser.add_argument("--shape", default="mixtral", choices=list(_SHAPES),
                        help="full sizes on CUDA, scaled down on the CPU; --tokens etc. override")
    for name, what in (("tokens", "T"), ("hidden", "H"), ("ffn", "F (per expert)"), ("experts", "E"),
                       ("topk", "k")):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"{what} (default: from --shape)")
    parser.add_argument("--dtype", choices=list(_DTYPES), default=None,
                        help="activations and weights (default: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per stage (default: 20 CUDA, 10 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 5 CUDA, 2 CPU)")
    parser.add_argument("--stages", default="all", help=f"comma-separated subset of: {', '.join(STAGES)}")
    parser.add_argument("--threads", type=int, default=0, help="CPU: intra-op threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ceil-gbps", type=float, default=CEIL_GBPS,
                        help="memory ceiling for the fraction column (default: GPU.md's H100 copy bandwidth)")
    parser.add_argument("--ceil-tflops", type=float, default=CEIL_TFLOPS,
                        help="matmul ceiling for the fraction column (default: GPU.md's H100 dense bf16)")
    parser.add_argument("--no-flush", action="store_true", help="CUDA: keep L2 warm between timed calls")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the table and the run's metadata here")
    parser.add_argument("--png", default=None, metavar="PATH", help="bar charts of the table (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


# ---- timing ------------------------------------------------------------------------------------

class _Timer:
    """Times fn() calls: per call in milliseconds, after `warmup` untimed calls of each function.

    pair(ours, base) alternates the two functions call by call, so that whatever else runs on
    the machine (other processes sharing the CPU cores) weighs on both alike."""

    def __init__(self, device, iters, warmup, flush):
        self.device, self.iters, self.warmup = device, iters, warmup
        self.flush_buf = None
        if device.type == "cuda" and flush:
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (50 << 20)
            self.flush_buf = torch.empty(2 * l2, dtype=torch.uint8, device=device)

    def pair(self, *fns):
        """Median milliseconds of every fn in fns (None: not timed), calls interleaved."""
        live = [fn for fn in fns if fn is not None]
        for _ in range(self.warmup):
            for fn in live:
                fn()
        times = [[] for _ in live]
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        for i in range(self.iters):
            for j, fn in enumerate(live):
                if cuda:
                    if self.flush_buf is not None:
                        self.flush_buf.fill_(i & 0xFF)
                    # NOTE: the host waits for the flush, so each call's launch overhead is timed too
                    # (else it hides behind the flush); eager calls, as a user makes them.
                    torch.cuda.synchronize(self.device)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    times[j].append((start, end))
                else:
                    t0 = time.perf_counter()
                    fn()
                    times[j].append((time.perf_counter() - t0) * 1e3)
        if cuda:
            torch.cuda.synchronize(self.device)
            times = [[s.elapsed_time(e) for s, e in ts] for ts in times]
        medians = iter(statistics.median(ts) for ts in times)
        return [next(medians) if fn is not None else None for fn in fns]


def _rel_err(ours, ref):
    """max |ours - ref| / max |ref|, in float32 (float64 for float64) and in row chunks, so that
    checking GB-sized outputs needs little extra memory. inf when the shapes differ."""
    if ours.shape != ref.shape:
        return math.inf
    if ref.numel() == 0:
        return 0.0
    acc = torch.float64 if torch.float64 in (ours.dtype, ref.dtype) else torch.float32
    ours, ref = ours.reshape(ours.shape[0], -1), ref.reshape(ref.shape[0], -1)
    step = max(1, (1 << 26) // max(ref.shape[1], 1))
    diff = scale = 0.0
    for i in range(0, ref.shape[0], step):
        o, r = ours[i:i + step].to(acc), ref[i:i + step].to(acc)
        diff = max(diff, float((o - r).abs().max()))
        scale = max(scale, float(r.abs().max()))
    return diff / max(scale, 1e-30)


# ---- baselines: what a user writes with plain torch --------------------------------------------

def _acc(dtype):
    """float32 for 16-bit and float32 data, float64 for float64: the accumulation dtype."""
    return torch.promote_types(dtype, torch.float32)


def torch_gating(logits, k):
    """softmax + topk + renormalise: (weights [T, k] float32 (float64 for float64), ids [T, k] int64)."""
    p = torch.softmax(logits.to(_acc(logits.dtype)), -1)
    w, i = p.topk(k, -1)
    return w / w.sum(-1, keepdim=True), i


def torch_permute(x, idx, num_experts):
    """argsort + index_select: (x_perm [T*k, H], order [T*k] slot of each row, counts [E])."""
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return x.index_select(0, order // idx.shape[1]), order, torch.bincount(flat, minlength=num_experts)


def torch_unpermute(y_perm, order, w, num_tokens):
    """index_add_ of the weighted rows into a float32 (float64) [T, H]; returns y_perm's dtype."""
    k, acc = w.shape[1], _acc(y_perm.dtype)
    out = torch.zeros(num_tokens, y_perm.shape[1], dtype=acc, device=y_perm.device)
    out.index_add_(0, order // k, y_perm.to(acc) * w.reshape(-1)[order].unsqueeze(1).to(acc))
    return out.to(y_perm.dtype)


def torch_swiglu(h):
    """silu(gate) * up in float32, rounded to h's dtype."""
    n = h.shape[1] // 2
    return (torch.nn.functional.silu(h[:, :n].float()) * h[:, n:].float()).to(h.dtype)


def torch_swiglu_backward(grad, h):
    """d/dh of silu(gate) * up for h = [gate | up], in float32: the eager formula moe_ext used
    before its fused op."""
    n = h.shape[1] // 2
    gate, up, g = h[:, :n].float(), h[:, n:].float(), grad.float()
    sig = torch.sigmoid(gate)
    return torch.cat([g * up * (sig * (1 + gate * (1 - sig))), g * gate * sig], dim=1).to(h.dtype)


def torch_expert_loop(a, b, counts):
    """One torch.mm per expert over its rows (host counts): [M, K] x [E, K, N] -> [M, N]."""
    out = a.new_empty(a.shape[0], b.shape[2])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            torch.mm(a[start:start + n], b[e], out=out[start:start + n])
        start += n
    out[start:].zero_()
    return out


def torch_moe_layer(x, router_weight, w1, w2, k):
    """The reference MoE SwiGLU layer: softmax/topk router in float32 (float64 for float64), per-expert
    gather, matmul, SwiGLU, matmul, weighted index_add_ in that precision. x [T, H]; w1 [E, H, 2F];
    w2 [E, F, H]."""
    T, E, F_ = x.shape[0], w1.shape[0], w2.shape[1]
    acc = _acc(x.dtype)
    logits = F.linear(x.to(acc), router_weight.to(acc))
    w, idx = torch_gating(logits, k)
    out = torch.zeros(T, x.shape[1], dtype=acc, device=x.device)
    # NOTE: unbind once: w1[e] in the loop would make each backward build a zero tensor of the
    # whole [E, H, 2F] weight per expert (select_backward), inflating the baseline's time.
    w1s, w2s = w1.unbind(0), w2.unbind(0)
    for e in range(E):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w1s[e]
        y = (F.silu(h[:, :F_]) * h[:, F_:]) @ w2s[e]
        out.index_add_(0, tok, y.to(acc) * w[tok, slot].unsqueeze(1))  # in place: no [T, H] copy per expert
    return out.to(x.dtype)


# ---- the stages --------------------------------------------------------------------------------

class _Bench:
    def __init__(self, cfg, device, dtype, timer):
        import moe_ext

        self.m = moe_ext
        self.cfg, self.device, self.dtype, self.timer = cfg, device, dtype, timer
        T, H, E, k = cfg["tokens"], cfg["hidden"], cfg["experts"], cfg["topk"]
        self.x = self.randn(T, H, seed=0)
        self.logits = self.randn(T, E, seed=1, dtype=torch.float32)
        try:
            self.w, self.idx, _ = moe_ext.topk_gating(self.logits, k)
        except (RuntimeError, NotImplementedError):  # no gating kernel for this device: route with torch
            w, idx = torch_gating(self.logits, k)
            self.w, self.idx = w.float(), idx.to(torch.int32)
        self.elem = self.x.element_size()

    def randn(self, *shape, seed, dtype=None, scale=1.0):
        """Seeded normal numbers made on the device itself (the full shapes are GBs)."""
        gen = torch.Generator(device=self.device).manual_seed(self.cfg["seed"] * 1000 + seed)
        t = torch.randn(shape, generator=gen, device=self.device, dtype=dtype or self.dtype)
        return t.mul_(scale) if scale != 1.0 else t

    def _row(self, stage, shape, ours, base, err, work, unit, baseline, exact=False, tol=None):
        ours_ms, base_ms = self.timer.pair(ours, base)
        tol = 0.0 if exact else (tol if tol is not None else _TOL[self.dtype])
        rate = work / (ours_ms * 1e-3) / (1e9 if unit == "GB/s" else 1e12)
        ceil = self.cfg["ceil_gbps"] if unit == "GB/s" else self.cfg["ceil_tflops"]
        return dict(stage=stage, shape=shape, ours_ms=ours_ms, base_ms=base_ms,
                    speedup=(base_ms / ours_ms) if base_ms else None, work=work, unit=unit, rate=rate,
                    frac_ceil=(rate / ceil) if self.device.type == "cuda" else None,
                    max_err=err, tol=tol, ok=bool(err <= tol), baseline=baseline)

    def gating(self):
        T, E, k = self.logits.shape[0], self.logits.shape[1], self.cfg["topk"]
        w, idx, _ = self.m.topk_gating(self.logits, k)
        bw, bidx = torch_gating(self.logits, k)
        dense = torch.zeros(T, E, device=self.device, dtype=torch.float64)
        ours, base = dense.clone().scatter_(1, idx.long(), w.double()), dense.scatter_(1, bidx, bw.double())
        if E > k:  # NOTE: rows whose k-th and (k+1)-th scores tie within float32 rounding may pick either
            top = torch.softmax(self.logits.float(), dim=-1).topk(k + 1, dim=-1).values
            clear = top[:, k - 1] - top[:, k] > 1e-6 * top[:, k - 1]
            ours, base = ours[clear], base[clear]
        err = _rel_err(ours, base)
        return [self._row("gating", f"T={T} E={E} k={k} fp32", lambda: self.m.topk_gating(self.logits, k),
                          lambda: torch_gating(self.logits, k), err, T * E * 4 + T * k * 8, "GB/s",
                          "softmax+topk+renorm", tol=1e-5)]

    def _layout_rows(self, names, ours_fwd, ours_back):
        """permute/unpermute or dispatch/combine (both lay rows out like the argsort baseline).
        ours_fwd() -> (rows [R, H], state, counts [E]); ours_back(y [R, H], state) -> [T, H]."""
        T, H = self.x.shape
        E, k = self.cfg["experts"], self.cfg["topk"]
        x_perm, state, counts = ours_fwd()
        bx, order, bcounts = torch_permute(self.x, self.idx, E)
        err = _rel_err(x_perm[:T * k], bx) if torch.equal(counts.long(), bcounts) else math.inf
        shape = f"T={T} H={H} k={k}"
        byts = (T * H + T * k * H) * self.elem
        rows = [self._row(names[0], shape, lambda: ours_fwd(), lambda: torch_permute(self.x, self.idx, E), err,
                          byts, "GB/s", "argsort+index_select", exact=True)]
        y_perm = self.randn(*x_perm.shape, seed=2)
        ours_out = ours_back(y_perm, state)
        err = _rel_err(ours_out, torch_unpermute(y_perm[:T * k], order, self.w, T))
        rows.append(self._row(names[1], shape, lambda: ours_back(y_perm, state),
                              lambda: torch_unpermute(y_perm[:T * k], order, self.w, T), err, byts, "GB/s",
                              "index_add weighted sum"))
        return rows

    def permute(self):
        E = self.cfg["experts"]
        return self._layout_rows(("permute", "unpermute"), lambda: self.m.permute(self.x, self.idx, E),
                                 lambda y, row_map: self.m.unpermute(y, row_map, self.w))

    def dispatch(self):
        E = self.cfg["experts"]

        def fwd():
            recv_x, tpe, handle = self.m.dispatch(self.x, self.idx, self.w, E, group=None)
            return recv_x, handle, tpe

        return self._layout_rows(("dispatch (W=1)", "combine (W=1)"), fwd, lambda y, handle: self.m.combine(y, handle))

    def gemm(self, which):
        H, F_, E = self.cfg["hidden"], self.cfg["ffn"], self.cfg["experts"]
        K, N = (H, 2 * F_) if which == "up" else (F_, H)
        x_perm, _, tpe = self.m.permute(self.x, self.idx, E, sync=True)
        M = x_perm.shape[0]
        a = self.randn(M, K, seed=3) if K != H else x_perm
        b = self.randn(E, K, N, seed=4, scale=1 / math.sqrt(K))
        ref = torch_expert_loop(a, b, tpe)
        flops = 2.0 * M * K * N
        shape = f"M={M} E={E} K={K} N={N}"
        rows = [self._row(f"gemm {which}", shape, lambda: self.m.grouped_gemm(a, b, tpe),
                          lambda: torch_expert_loop(a, b, tpe), _rel_err(self.m.grouped_gemm(a, b, tpe), ref),
                          flops, "TFLOP/s", "torch.mm per expert")]
        grouped_mm = getattr(torch, "_grouped_mm", None)
        if grouped_mm is not None:
            offs = torch.cumsum(tpe.long(), 0).to(torch.int32)
            bt = b.transpose(1, 2).contiguous().transpose(1, 2)  # [E, K, N] views of an [E, N, K] tensor
            try:
                got = grouped_mm(a, bt, offs=offs)
                err = _rel_err(self.m.grouped_gemm(a, b, tpe), got)
            except (RuntimeError, NotImplementedError, TypeError) as e:
                rows.append(dict(stage=f"gemm {which}", shape=shape, baseline="torch._grouped_mm",
                                 skipped=f"torch._grouped_mm unavailable here: {str(e).splitlines()[0][:120]}"))
            else:
                rows.append(self._row(f"gemm {which}", shape, lambda: self.m.grouped_gemm(a, b, tpe),
                                      lambda: grouped_mm(a, bt, offs=offs), err, flops, "TFLOP/s",
                                      "torch._grouped_mm"))
        return rows

    def swiglu(self):
        """SwiGLU as a stage of its own (what the layer runs in training, keeping the up-projection)
        and its gradient, over the up-projection's rows (M = T*k, n = ffn)."""
        F_, M = self.cfg["ffn"], self.x.shape[0] * self.cfg["topk"]
        h, g = self.randn(M, 2 * F_, seed=6), self.randn(M, F_, seed=7)
        shape = f"M={M} F={F_}"
        fwd = lambda: self.m.gemm.swiglu(h)  # noqa: E731
        bwd = lambda: self.m._ops.ops.swiglu_backward(g, h)  # noqa: E731
        return [self._row("swiglu (fwd)", shape, fwd, lambda: torch_swiglu(h), _rel_err(fwd(), torch_swiglu(h)),
                          3 * M * F_ * self.elem, "GB/s", "torch eager formula (fp32)"),
                self._row("swiglu (bwd)", shape, bwd, lambda: torch_swiglu_backward(g, h),
                          _rel_err(bwd(), torch_swiglu_backward(g, h)), 5 * M * F_ * self.elem, "GB/s",
                          "torch eager formula (fp32)")]

    def layer(self):
        T, H = self.x.shape
        F_, E, k = self.cfg["ffn"], self.cfg["experts"], self.cfg["topk"]
        torch.manual_seed(self.cfg["seed"])
        layer = self.m.MoE(H, F_, E, k, device=self.device, dtype=self.dtype)
        x = self.x.detach().clone().requires_grad_(True)
        g = self.randn(T, H, seed=5)
        params = [layer.router.weight, layer.w1, layer.w2]

        def run(fn):
            for p in params + [x]:
                p.grad = None
            out = fn(x)
            out.backward(g)
            return out

        def ours():
            return run(layer)

        def base():
            return run(lambda t: torch_moe_layer(t, layer.router.weight, layer.w1, layer.w2, k))

        # NOTE: the weight gradients are compared on their first 16 experts: at the full DeepSeek
        # shape two sets of all the experts' gradients would not fit next to the weights.
        n = min(E, 16)

        def checked():
            return [x.grad, layer.router.weight.grad, layer.w1.grad[:n], layer.w2.grad[:n]]

        out = ours().detach()
        grads = [t.detach().clone() for t in checked()]
        ref_out = base().detach()
        ref_grads = [t.detach().clone() for t in checked()]
        err = max([_rel_err(out, ref_out)] + [_rel_err(a, b) for a, b in zip(grads, ref_grads)])
        del grads, out
        M = T * k
        flops = 3.0 * (2.0 * T * H * E + 2.0 * M * H * 2 * F_ + 2.0 * M * F_ * H)
        tol = _TOL[self.dtype] * (10 if self.dtype in (torch.float32, torch.float64) else 1)
        shape = f"T={T} H={H} F={F_} E={E} k={k}"
        rows = [self._row("layer fwd+bwd", shape, ours, base, err, flops, "TFLOP/s", "plain-torch layer", tol=tol)]
        # The same layer with recompute_activation=True: fewer values kept, the up-projection run
        # again in the backward (its FLOPs not counted: the same work as the row above).
        layer.recompute_activation = True
        out = ours().detach()
        err = max([_rel_err(out, ref_out)] + [_rel_err(a, b) for a, b in zip(checked(), ref_grads)])
        rows.append(self._row("layer fwd+bwd (recompute)", shape, ours, base, err, flops, "TFLOP/s",
                              "plain-torch layer", tol=tol))
        return rows


# ---- output ------------------------------------------------------------------------------------

def _fmt_work(work, unit):
    if unit == "GB/s":
        return f"{work / 1e9:.3f} GB" if work >= 1e8 else f"{work / 1e6:.2f} MB"
    return f"{work / 1e12:.3f} TF" if work >= 1e11 else f"{work / 1e9:.2f} GF"


def _fmt_rate(rate, unit):
    return f"{rate:.1f} {unit}" if unit == "GB/s" else (f"{rate:.1f} {unit}" if rate >= 1 else f"{rate:.3f} {unit}")


def format_table(rows):
    head = (f"{'stage':<26} {'shape':<27} {'ours ms':>9} {'base ms':>9} {'speedup':>8} {'work':>10} "
            f"{'ours rate':>15} {'%ceil':>6} {'max err':>8} {'check':>5}  baseline")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['stage']:<26} {r['shape']:<27} {'':>9} {'n/a':>9}  {r['skipped']}")
            continue
        base = f"{r['base_ms']:9.3f}" if r["base_ms"] is not None else f"{'n/a':>9}"
        spd = f"{r['speedup']:7.2f}x" if r["speedup"] else f"{'n/a':>8}"
        frac = f"{100 * r['frac_ceil']:5.1f}%" if r["frac_ceil"] is not None else f"{'n/a':>6}"
        lines.append(f"{r['stage']:<26} {r['shape']:<27} {r['ours_ms']:9.3f} {base} {spd} "
                     f"{_fmt_work(r['work'], r['unit']):>10} {_fmt_rate(r['rate'], r['unit']):>15} {frac} "
                     f"{r['max_err']:8.1e} {'ok' if r['ok'] else 'FAIL':>5}  {r['baseline']}")
    return "\n".join(lines)


def _git_commit():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    return (commit or None), (bool(dirty) if commit else None)


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _plot(rows, meta, path):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print(f"moe-ext bench: matplotlib is not installed, no plot written to {path} (pip install matplotlib)",
              file=sys.stderr)
        return False
    rows = [r for r in rows if "skipped" not in r]
    labels = [f"{r['stage']}\nvs {r['baseline']}" for r in rows]
    xs = range(len(rows))
    on_cuda = meta["device_type"] == "cuda"
    fig = Figure(figsize=(max(8, 1.3 * len(rows)), 9 if on_cuda else 7.5), constrained_layout=True)
    FigureCanvasAgg(fig)
    ratios = [2, 1.4, 1.4 if on_cuda else 0.3]
    ax_t, ax_s, ax_c = fig.subplots(3, 1, sharex=True, gridspec_kw=dict(height_ratios=ratios))
    ax_t.bar([i - 0.2 for i in xs], [r["ours_ms"] for r in rows], 0.4, label="moe_ext")
    ax_t.bar([i + 0.2 for i in xs], [r["base_ms"] or 0 for r in rows], 0.4, label="torch baseline")
    ax_t.set_yscale("log")
    ax_t.set_ylabel("time (ms, median)")
    ax_t.legend(fontsize=8)
    spd = [r["speedup"] or 1.0 for r in rows]  # bars from 1x: up = faster than the baseline
    ax_s.bar(list(xs), [v - 1.0 for v in spd], 0.5, bottom=1.0,
             color=["tab:green" if v >= 1 else "tab:red" for v in spd])
    for i, v in enumerate(spd):
        ax_s.text(i, v, f"{v:.2f}x", ha="center", va="bottom" if v >= 1 else "top", fontsize=7)
    ax_s.axhline(1.0, color="gray", lw=0.8)
    ax_s.set_yscale("log")
    lo, hi = min(spd + [1.0]), max(spd + [1.0])
    ax_s.set_ylim(lo / 1.5, hi * 1.5)
    fmt = FuncFormatter(lambda v, _: f"{v:g}x")
    ax_s.yaxis.set_major_formatter(fmt)
    ax_s.yaxis.set_minor_formatter(fmt)
    ax_s.set_ylabel("speedup over baseline\n(baseline / ours)")
    if on_cuda:
        ax_c.bar(list(xs), [100 * r["frac_ceil"] for r in rows], 0.5, color="tab:purple")
        c = meta["ceilings"]
        ax_c.set_ylabel(f"% of ceiling\n({c['gbps'] / 1e3:g} TB/s, {c['tflops']:g} TFLOP/s)")
    else:
        ax_c.text(0.5, 0.5, "fraction of the roofline: n/a on the CPU (the ceilings are the H100's)",
                  ha="center", va="center", transform=ax_c.transAxes)
        ax_c.set_yticks([])
    ax_c.set_xticks(list(xs))
    ax_c.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    fig.suptitle(f"moe-ext bench on {meta['device_name']} ({meta['dtype']}, {meta['shape_desc']})", fontsize=9)
    fig.savefig(path, dpi=110)
    return True


def _resolve(args):
    """(config dict, device, dtype) from the parsed arguments; raises ValueError on bad ones."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is None:  # NOTE: set_device needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = dict(_SHAPES[args.shape]["cuda" if device.type == "cuda" else "cpu"])
    for name in cfg:
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    for name, v in cfg.items():
        if v < 1:
            raise ValueError(f"--{name} must be >= 1, got {v}")
    if cfg["topk"] > cfg["experts"]:
        raise ValueError(f"--topk {cfg['topk']} must be <= --experts {cfg['experts']}")
    for name, least in (("iters", 1), ("warmup", 0), ("threads", 0)):
        v = getattr(args, name, None)
        if v is not None and v < least:
            raise ValueError(f"--{name} must be >= {least}, got {v}")
    cfg["seed"] = args.seed
    ceil = (getattr(args, "ceil_gbps", CEIL_GBPS), getattr(args, "ceil_tflops", CEIL_TFLOPS))
    if not (ceil[0] > 0 and ceil[1] > 0):
        raise ValueError(f"--ceil-gbps and --ceil-tflops must be > 0, got {ceil[0]} and {ceil[1]}")
    cfg["ceil_gbps"], cfg["ceil_tflops"] = ceil
    dtype = _DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    return cfg, device, dtype


def run(args):
    """Runs the bench from parsed arguments; prints the table; returns the exit status
    (1 when a stage failed its check or raised)."""
    try:
        cfg, device, dtype = _resolve(args)
        stages = list(STAGES) if args.stages == "all" else [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    except ValueError as e:
        print(f"moe-ext bench: {e}", file=sys.stderr)
        return 2
    import moe_ext

    from .demo import _Progress

    on_cuda = device.type == "cuda"
    iters = args.iters if args.iters is not None else (20 if on_cuda else 10)
    warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 2)
    if on_cuda:
        torch.cuda.set_device(device)
    elif args.threads:
        torch.set_num_threads(args.threads)
    commit, dirty = _git_commit()
    try:
        load = os.getloadavg()[0]  # other work on the machine: CPU timings depend on it
    except (AttributeError, OSError):
        load = None
    scaled = "" if on_cuda or args.shape == "custom" else " scaled for the CPU"
    meta = dict(device_type=device.type, device_name=_device_name(device), torch=torch.__version__,
                cuda=torch.version.cuda, moe_ext=moe_ext.__version__, git_commit=commit, git_dirty=dirty,
                threads=torch.get_num_threads(), load_avg_1min=load, dtype=str(dtype).replace("torch.", ""),
                shape=args.shape,
                shape_desc=f"{args.shape}{scaled}: T={cfg['tokens']} H={cfg['hidden']} F={cfg['ffn']} "
                           f"E={cfg['experts']} k={cfg['topk']}",
                config=cfg, iters=iters, warmup=warmup, l2_flush=on_cuda and not args.no_flush,
                timing="median of CUDA events" if on_cuda else "median of perf_counter",
                ceilings=dict(gbps=args.ceil_gbps, tflops=args.ceil_tflops,
                              source="GPU.md, H100" if (args.ceil_gbps, args.ceil_tflops) == (CEIL_GBPS, CEIL_TFLOPS)
                              else "--ceil-gbps / --ceil-tflops"),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    where = meta["device_name"]
    if not on_cuda:
        where += f", {meta['threads']} threads" + (f", load average {load:.2f}" if load is not None else "")
    print(f"# moe-ext bench on {where}; torch {meta['torch']}, moe_ext {meta['moe_ext']}"
          f"{' @ ' + commit[:10] + ('+dirty' if dirty else '') if commit else ''}")
    print(f"# {meta['dtype']}, {meta['shape_desc']}; {meta['timing']} of {iters} calls after {warmup} warm-up")
    timer = _Timer(device, iters, warmup, flush=not args.no_flush)
    bench = _Bench(cfg, device, dtype, timer)
    # One runner per stage; permute/unpermute (and dispatch/combine) share one: the second needs
    # the first's layout.
    gemm_up, gemm_down = (lambda: bench.gemm("up")), (lambda: bench.gemm("down"))
    runners = {"gating": bench.gating, "permute": bench.permute, "unpermute": bench.permute, "gemm up": gemm_up,
               "gemm down": gemm_down, "swiglu": bench.swiglu, "dispatch": bench.dispatch, "combine": bench.dispatch,
               "layer fwd+bwd": bench.layer}
    wanted, todo = set(stages), []
    for name in STAGES:
        if name in wanted and all(runners[name] != fn for _, fn in todo):
            todo.append((name, runners[name]))
    rows, failed = [], []
    progress = _Progress(len(todo), "bench", enabled=not args.no_progress)
    try:
        for name, fn in todo:
            try:
                rows.extend(fn())
            except Exception as e:  # one stage failing (an op missing on this device, OOM) must not stop the others
                failed.append(name)
                rows.append(dict(stage=name, shape="", baseline="", skipped=f"FAILED: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:150] if str(e) else ''}"))
            if on_cuda:
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
            progress.update()
    finally:
        progress.close()
    rows = [r for r in rows if r["stage"].split(" (")[0] in wanted or "FAILED" in r.get("skipped", "")]
    print(format_table(rows))
    if on_cuda:
        print(f"# %ceil: of {args.ceil_gbps / 1e3:g} TB/s (GB/s rows) or {args.ceil_tflops:g} TFLOP/s (TFLOP/s rows): "
              f"{meta['ceilings']['source']}")
    else:
        print("# %ceil: n/a on the CPU (the ceilings, 2.95 TB/s and 764 TFLOP/s, are the H100's in GPU.md)")
    print("# dispatch/combine at world 1 (no communication); multi-rank rows come with the GPU backends (ipc/nccl)")
    wrong = [r["stage"] for r in rows if "skipped" not in r and not r["ok"]]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, failed=failed, wrong=wrong), f, indent=1)
        print(f"wrote {args.json}")
    if args.png and _plot(rows, meta, args.png):
        print(f"wrote {args.png}")
    if wrong or failed:
        print(f"moe-ext bench: check failed for {wrong}, stage(s) raised: {failed}", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="moe-ext bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
