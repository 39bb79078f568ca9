"""Parallel-layout planner for an MoE transformer: memory per GPU and communication per step.

An estimator, not a simulator: every number below is a closed formula of the model and cluster
sizes, written out here so that a reader can redo it by hand (tests/test_plan.py does).

Layouts
-------
N GPUs are split as N = ep * tp * dp (every factorisation; ep must divide the expert count E):
  * tp: tensor parallelism. Every weight matrix (attention, dense FFN, shared and routed
    experts: w1 [H, 2F] by columns, w2 [F, H] by rows) is split over the tp ranks of a group;
    the tp ranks of a group hold the same tokens.
  * ep: expert parallelism. Each ep rank holds E / ep whole routed experts (each still split over
    tp). For everything except the routed experts the ep ranks are data-parallel: they hold the
    same non-expert weights and different tokens (EP is carved out of data parallelism).
  * dp: data parallelism. Full copies of the (ep x tp)-sharded model; for the routed experts this
    is replication (EP x DP), the copies are kept equal by a gradient all-reduce.
Layout names list the degrees above 1: TP, EP, DP, EPxTP, EPxDP, TPxDP, EPxTPxDP ("single" for
one GPU). Rank r has coordinates tp_i = r % tp, ep_i = (r // tp) % ep, dp_i = r // (tp * ep)
(tp innermost); GPU r sits on node r // gpus_per_node.

Model sizes (ModelSpec), P = parameter counts
---------------------------------------------
  P_experts    = moe_layers * E * 3 * H * F           routed experts (w1: H x 2F, w2: F x H)
  P_replicated = dense_params                         attention, embeddings, norms, dense FFN layers
               + moe_layers * 3 * H * shared_ffn      shared experts (shared_ffn: their total width)
               + moe_layers * E * H                   routers
  params per GPU = P_experts / (ep * tp) + P_replicated / tp

Memory per GPU (GB = 1e9 bytes)
-------------------------------
  weights = params per GPU * bytes_per_param
  state   = params per GPU * state_bytes_per_param   (weights, gradients and optimizer state)
state_bytes_per_param is --optimizer-bytes-per-param when given, else 2 * bytes_per_param + 12
when training (half-precision weights and gradients, fp32 master weights and Adam m, v: 16 for
bf16) and bytes_per_param for inference. With --shard-optimizer (training; ZeRO-1 / distributed
optimizer) the optimizer part, opt = state_bytes_per_param - 2 * bytes_per_param, is split over
the ranks holding copies of the same parameters, and the weights and gradients are not:
  state = P_experts / (ep * tp) * (2 * bytes + opt / dp)
        + P_replicated / tp * (2 * bytes + opt / (ep * dp))
(the gradient sync becomes a reduce-scatter plus an all-gather of the weights: the same bytes).
A layout fits when state <= mem_gb. Activations, the KV cache, communication buffers and
fragmentation are NOT counted: keep headroom.

Tokens: B and S are GLOBAL
--------------------------
--batch B sequences of --seq-len S tokens per step for the whole cluster, so every layout is
compared at the same work. Each tp group holds one data shard: T = B * S / (ep * dp) tokens per
GPU. Activations travel in bytes_per_param bytes per element.

Bytes each GPU sends per step (per kind)
----------------------------------------
passes = 2 when training (the backward pass moves the same activations again: the gradient of a
dispatch is a combine, of an all-reduce an all-reduce), 1 for inference.
  * EP all-to-all, per MoE layer and pass: issue 9's 2 x B x S x H (dispatch + combine, B x S
    read as this GPU's T tokens) times bytes and the expected number of OTHER ranks a token is
    sent to. With uniform routing of k distinct experts out of E over ep ranks holding E / ep
    experts each, a given rank receives a token with probability
    p = 1 - C(E - E/ep, k) / C(E, k) (C: binomial coefficient), so the expected routing fan-out
    (distinct destination ranks per token, the token's own rank included) is ep * p, and the
    part sent is (ep - 1) * p (the fraction 1/ep of the fan-out that stays on the local rank is
    not sent; a token crosses to a rank once however many of its k experts live there, as
    moe_ext.dispatch does):
        ep_bytes = passes * moe_layers * 2 * T * H * bytes * (ep - 1) * p
    Assumption: the combine returns as many rows as the dispatch sent, one per (token,
    destination rank), i.e. the destination sums a token's expert outputs before sending them
    back (as DeepEP's combine does). moe_ext.combine instead returns one row per kept slot (the
    source sums them in slot order, for bit-exact results): k * (ep - 1) / ep rows per token
    under uniform routing instead of (ep - 1) * p, the same when E / ep = 1 or k = 1, more when
    a rank holds several of a token's experts (tests/test_plan.py measures both against a gloo
    dispatch / combine). Only token rows are counted, not the small metadata that travels with
    them (row counts, expert ids).
    With ep x tp, tp rank i of a group dispatches its tokens to tp rank i of the destination
    group, so every rank of the expert's tp group gets the token; the partial expert outputs are
    combined back and summed by the layer's tp all-reduce (below), as for a dense MLP.
  * TP all-reduce, issue 9's 2 x B x S x H x L: one ring all-reduce of the [T, H] activations
    per layer and pass (B x S read as the T tokens of one tp group, L = layers), in which every
    rank sends 2 * T * H * bytes * (tp - 1) / tp:
        tp_bytes = passes * layers * 2 * T * H * bytes * (tp - 1) / tp
    Assumption: TP_ALLREDUCES_PER_LAYER = 1, as issue 9 counts. A Megatron-style layer whose
    attention is split over tp too all-reduces twice per layer and pass (after attention, after
    the MLP / MoE), so there the real TP traffic is up to 2x this number.
  * DP gradient sync (training only), ring all-reduce of the gradients of every replicated
    parameter, in bytes_per_param bytes, over the ranks holding the same copy:
        dp_bytes = 2 * P_experts / (ep * tp) * bytes * (dp - 1) / dp                (over dp ranks)
                 + 2 * P_replicated / tp * bytes * (ep * dp - 1) / (ep * dp)        (over ep * dp ranks)

Time
----
Each kind's bytes go at --nvlink-gbps when every one of its groups lies inside a node, else at
--net-gbps (the whole kind, even the part that stays inside a node: pessimistic); GB/s = 1e9
bytes per second, per GPU and direction. Groups: tp (size tp, stride 1), ep (size ep, stride tp),
experts' dp (size dp, stride ep * tp), the rest's dp (size ep * dp, stride tp). The estimated
communication time per step is the sum of the kinds (no overlap with compute or each other).
Rows are sorted by that time (then state memory); the first row that fits is marked best.
"""
import json
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Sequence, Union

import numpy as np

GB = 1e9
# TP all-reduces of the [T, H] activations per layer and pass: 1, issue 9's 2 x B x S x H x L
# (a Megatron-style layer with TP attention has 2: after attention and after the MLP / MoE).
TP_ALLREDUCES_PER_LAYER = 1
MODES = ("train", "infer")


class PlanError(ValueError):
    """A bad ModelSpec / ClusterSpec value; `field` names it (the CLI flag is --field-with-dashes)."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _need(obj, field, ok, what):
    if not ok:
        raise PlanError(field, f"{type(obj).__name__}.{field} {what}, got {getattr(obj, field)!r}")


@dataclass
class ModelSpec:
    """An MoE transformer's sizes. Parameter counts are plain numbers of parameters (not bytes)."""
    layers: int  # transformer layers L
    hidden: int  # H
    ffn: int  # F: one routed expert's FFN hidden size (w1 [H, 2F], w2 [F, H])
    experts: int  # E routed experts per MoE layer
    topk: int  # k experts per token
    moe_layers: Optional[int] = None  # MoE layers among the L (None = all)
    shared_ffn: int = 0  # total FFN width of the shared experts of one MoE layer (0 = none)
    dense_params: float = 0.0  # everything outside the MoE blocks: attention, embeddings, norms, dense FFNs
    bytes_per_param: float = 2.0  # weights, gradients and activations (2: bf16)
    name: str = "custom"

    def __post_init__(self):
        if self.moe_layers is None:
            self.moe_layers = self.layers
        for f in ("layers", "hidden", "ffn", "experts", "topk"):
            _need(self, f, _is_int(getattr(self, f)) and getattr(self, f) >= 1, "must be an integer >= 1")
        _need(self, "moe_layers", _is_int(self.moe_layers) and 0 <= self.moe_layers <= self.layers,
              f"must be an integer in [0, layers={self.layers}]")
        _need(self, "topk", self.topk <= self.experts, f"must be <= experts={self.experts}")
        _need(self, "shared_ffn", _is_int(self.shared_ffn) and self.shared_ffn >= 0, "must be an integer >= 0")
        _need(self, "dense_params", 0 <= self.dense_params < math.inf, "must be finite and >= 0")
        _need(self, "bytes_per_param", 0 < self.bytes_per_param < math.inf, "must be finite and > 0")

    @property
    def expert_params(self):
        """P_experts: routed-expert parameters of the whole model."""
        return self.moe_layers * self.experts * 3 * self.hidden * self.ffn

    @property
    def replicated_params(self):
        """P_replicated: everything but the routed experts (dense, shared experts, routers)."""
        return self.dense_params + self.moe_layers * (3 * self.hidden * self.shared_ffn + self.experts * self.hidden)

    @property
    def total_params(self):
        return self.expert_params + self.replicated_params


@dataclass
class ClusterSpec:
    """The GPUs and the step. Bandwidths in GB/s (1e9 bytes/s) per GPU and direction."""
    gpus: int
    batch: int  # GLOBAL batch in sequences per step
    seq_len: int
    gpus_per_node: int = 8
    mem_gb: float = 80.0
    nvlink_gbps: float = 450.0  # H100 SXM: 900 GB/s both directions together
    net_gbps: float = 50.0  # one 400 Gb/s NIC per GPU
    optimizer_bytes_per_param: Optional[float] = None  # model state per parameter, weights included
    mode: str = "train"  # "train" (forward + backward + gradient sync) or "infer" (forward only)
    shard_optimizer: bool = False  # training: optimizer state split over the data-parallel copies (ZeRO-1)

    def __post_init__(self):
        for f in ("gpus", "batch", "seq_len", "gpus_per_node"):
            _need(self, f, _is_int(getattr(self, f)) and getattr(self, f) >= 1, "must be an integer >= 1")
        for f in ("mem_gb", "nvlink_gbps", "net_gbps"):
            _need(self, f, 0 < getattr(self, f) < math.inf, "must be finite and > 0")
        if self.optimizer_bytes_per_param is not None:
            _need(self, "optimizer_bytes_per_param", 0 < self.optimizer_bytes_per_param < math.inf,
                  "must be finite and > 0")
        _need(self, "mode", self.mode in MODES, f"must be one of {MODES}")

    @property
    def training(self):
        return self.mode == "train"

    def state_bytes_per_param(self, model):
        """Bytes of model state per parameter: the flag, else 2 * bytes + 12 (train) or bytes (infer)."""
        if self.optimizer_bytes_per_param is not None:
            return float(self.optimizer_bytes_per_param)
        b = model.bytes_per_param
        return 2 * b + 12 if self.training else b


# ---- presets -------------------------------------------------------------------------------------
# Architecture numbers from the models' public configs (Hugging Face config.json). dense_params is
# derived from them as written: attention projections, untied input embedding and output head,
# RMSNorm weights, and the dense FFN layers; routers and shared experts are counted by ModelSpec.

def _mixtral_8x7b():
    # Mixtral-8x7B-v0.1: 32 layers, all MoE; hidden 4096; expert FFN 14336; 8 experts, top-2;
    # no shared expert; 32 query heads / 8 KV heads of 128; vocab 32000, untied head.
    H, L, V = 4096, 32, 32000
    attention = H * 4096 + 2 * H * 1024 + 4096 * H  # q, k and v, o
    dense = 2 * V * H + L * attention + (2 * L + 1) * H  # = 1,604,587,520
    return ModelSpec(name="mixtral-8x7b", layers=L, moe_layers=L, hidden=H, ffn=14336, experts=8, topk=2,
                     shared_ffn=0, dense_params=dense)  # total 46.70e9 (published: 46.7B)


def _deepseek_v3():
    # DeepSeek-V3: 61 layers, the first 3 dense (FFN 18432), 58 MoE; hidden 7168; expert FFN 2048;
    # 256 routed experts, top-8; 1 shared expert of width 2048; MLA with 128 heads, q_lora_rank 1536,
    # kv_lora_rank 512, qk_nope 128 + qk_rope 64, v 128; vocab 129280, untied head. The multi-token
    # prediction module (11.5B more) is not counted.
    H, L, V, heads = 7168, 61, 129280, 128
    mla = (H * 1536 + 1536 + 1536 * heads * (128 + 64)  # q_a (+ its norm), q_b
           + H * (512 + 64) + 512 + 512 * heads * (128 + 128)  # kv_a (+ its norm), kv_b
           + heads * 128 * H)  # o
    dense = 2 * V * H + L * mla + (2 * L + 1) * H + 3 * 3 * H * 18432  # = 14,456,871,936
    return ModelSpec(name="deepseek-v3", layers=L, moe_layers=58, hidden=H, ffn=2048, experts=256, topk=8,
                     shared_ffn=2048, dense_params=dense)  # total 671.03e9 (published: 671B)


def _qwen3_moe():
    # Qwen3-235B-A22B (the largest Qwen3 MoE): 94 layers, all MoE; hidden 4096; expert FFN 1536;
    # 128 experts, top-8; no shared expert; 64 query heads / 4 KV heads of 128 with q/k RMSNorm;
    # vocab 151936, untied head.
    H, L, V = 4096, 94, 151936
    attention = H * 64 * 128 + 2 * H * 4 * 128 + 64 * 128 * H + 2 * 128  # q, k and v, o, q/k norms
    dense = 2 * V * H + L * attention + (2 * L + 1) * H  # = 7,947,955,712
    return ModelSpec(name="qwen3-moe", layers=L, moe_layers=L, hidden=H, ffn=1536, experts=128, topk=8,
                     shared_ffn=0, dense_params=dense)  # total 235.09e9 (published: 235B)


PRESETS = {"mixtral-8x7b": _mixtral_8x7b(), "deepseek-v3": _deepseek_v3(), "qwen3-moe": _qwen3_moe()}


# ---- routing fan-out and exact dispatch counts --------------------------------------------------

def rank_hit_probability(num_experts, topk, ep):
    """p = 1 - C(E - E/ep, k) / C(E, k): the chance that a given EP rank holds at least one of a
    token's k distinct, uniformly chosen experts."""
    if ep < 1 or num_experts % ep:
        raise ValueError(f"moe_ext.plan: ep={ep} must divide num_experts={num_experts}")
    if not 1 <= topk <= num_experts:
        raise ValueError(f"moe_ext.plan: topk={topk} must be in [1, num_experts={num_experts}]")
    return 1.0 - math.comb(num_experts - num_experts // ep, topk) / math.comb(num_experts, topk)


def routing_fanout(num_experts, topk, ep):
    """Expected distinct destination ranks per token (its own rank included): ep * p."""
    return ep * rank_hit_probability(num_experts, topk, ep)


def expected_dispatch_bytes(tokens, hidden, bytes_per_elem, num_experts, topk, ep):
    """Expected bytes ONE rank sends in ONE dispatch of `tokens` tokens under uniform routing:
    tokens * hidden * bytes_per_elem * (ep - 1) * p. (The planner counts the combine as sending as
    many back; moe_ext.combine returns one row per kept slot, see the module docstring.)"""
    return tokens * hidden * bytes_per_elem * (ep - 1) * rank_hit_probability(num_experts, topk, ep)


def ep_dispatch_bytes(tokens_per_rank: Union[int, Sequence[int]], hidden, bytes_per_elem,
                      idx_per_rank, num_experts, ep) -> List[int]:
    """The exact bytes each source rank sends in one dispatch for the given routing.

    tokens_per_rank: T_r for each of the ep ranks (or one int for all). idx_per_rank: ep arrays
    (torch or numpy) [T_r, k] of global expert ids, -1 = not routed. Expert e lives on rank
    e // (E / ep) (moe_ext.dispatch's contiguous placement). A token crosses to a destination
    rank once however many of its k experts live there; rows for its own rank are not sent.
    Only the token rows are counted (the [k] int32 local expert ids that travel with each row
    are metadata, not counted). Returns [ep] ints: crossing rows * hidden * bytes_per_elem.
    """
    if ep < 1 or num_experts % ep:
        raise ValueError(f"moe_ext.plan.ep_dispatch_bytes: ep={ep} must divide num_experts={num_experts}")
    if len(idx_per_rank) != ep:
        raise ValueError(f"moe_ext.plan.ep_dispatch_bytes: need one idx per rank ({ep}), got {len(idx_per_rank)}")
    if _is_int(tokens_per_rank):
        tokens_per_rank = [tokens_per_rank] * ep
    per_rank = num_experts // ep
    out = []
    for r, (t, idx) in enumerate(zip(tokens_per_rank, idx_per_rank)):
        idx = np.asarray(idx, dtype=np.int64)
        if idx.ndim != 2 or idx.shape[0] != t:
            raise ValueError(f"moe_ext.plan.ep_dispatch_bytes: idx of rank {r} must be [{t}, k], got {idx.shape}")
        if idx.size and (idx.min() < -1 or idx.max() >= num_experts):
            raise ValueError(f"moe_ext.plan.ep_dispatch_bytes: idx of rank {r} outside [-1, {num_experts})")
        goes = np.zeros((t, ep + 1), dtype=bool)  # column ep collects the unrouted (-1) slots
        dest = np.where(idx >= 0, idx // per_rank, ep)
        goes[np.arange(t)[:, None], dest] = True
        rows = int(goes[:, :ep].sum()) - int(goes[:, r].sum())
        out.append(rows * hidden * bytes_per_elem)
    return out


# ---- layouts -----------------------------------------------------------------------------------

def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(num_gpus, num_experts):
    """Every (ep, tp, dp) with ep * tp * dp = num_gpus and ep dividing num_experts."""
    return [(ep, tp, num_gpus // (ep * tp)) for ep in _divisors(num_gpus) if num_experts % ep == 0
            for tp in _divisors(num_gpus // ep)]


def layout_name(ep, tp, dp):
    parts = [n for n, d in (("EP", ep), ("TP", tp), ("DP", dp)) if d > 1]
    return "x".join(parts) if parts else "single"


def _link(num_gpus, gpus_per_node, size, stride):
    """'nvlink' if every group of `size` ranks at `stride` lies inside a node, 'net' if one does
    not, '-' for groups of one rank (no traffic)."""
    if size == 1:
        return "-"
    span = stride * (size - 1)
    firsts = (r for r in range(num_gpus) if (r // stride) % size == 0)  # the group's lowest rank
    return "nvlink" if all(r // gpus_per_node == (r + span) // gpus_per_node for r in firsts) else "net"


def plan(model: ModelSpec, cluster: ClusterSpec) -> List[dict]:
    """One row per layout (see the module docstring for every formula), sorted by estimated
    communication time per step; the first row that fits in memory has best=True."""
    N, gpn = cluster.gpus, cluster.gpus_per_node
    H, b = model.hidden, model.bytes_per_param
    s = cluster.state_bytes_per_param(model)
    passes = 2 if cluster.training else 1
    p_exp, p_rep = model.expert_params, model.replicated_params
    bandwidth = {"nvlink": cluster.nvlink_gbps * GB, "net": cluster.net_gbps * GB, "-": math.inf}
    rows = []
    for ep, tp, dp in layouts(N, model.experts):
        tokens = cluster.batch * cluster.seq_len / (ep * dp)
        params = p_exp / (ep * tp) + p_rep / tp
        if cluster.shard_optimizer and cluster.training:
            kept = min(s, 2 * b)  # weights and gradients stay whole; the optimizer part is split
            state = p_exp / (ep * tp) * (kept + (s - kept) / dp) + p_rep / tp * (kept + (s - kept) / (ep * dp))
        else:
            state = params * s
        p_hit = rank_hit_probability(model.experts, model.topk, ep)
        ep_bytes = passes * model.moe_layers * 2 * tokens * H * b * (ep - 1) * p_hit
        tp_bytes = passes * model.layers * TP_ALLREDUCES_PER_LAYER * 2 * tokens * H * b * (tp - 1) / tp
        dp_exp = 2 * p_exp / (ep * tp) * b * (dp - 1) / dp if cluster.training else 0.0
        dp_rep = 2 * p_rep / tp * b * (ep * dp - 1) / (ep * dp) if cluster.training else 0.0
        links = {"ep": _link(N, gpn, ep, tp), "tp": _link(N, gpn, tp, 1),
                 "dp_experts": _link(N, gpn, dp, ep * tp), "dp_rest": _link(N, gpn, ep * dp, tp)}
        ep_s = ep_bytes / bandwidth[links["ep"]]
        tp_s = tp_bytes / bandwidth[links["tp"]]
        dp_s = dp_exp / bandwidth[links["dp_experts"]] + dp_rep / bandwidth[links["dp_rest"]]
        dp_links = {links["dp_experts"], links["dp_rest"]} - {"-"}
        rows.append({
            "layout": layout_name(ep, tp, dp), "ep": ep, "tp": tp, "dp": dp,
            "tokens_per_gpu": tokens, "params_per_gpu": params,
            "weight_gb": params * b / GB, "state_gb": state / GB, "fits": state <= cluster.mem_gb * GB,
            "ep_fanout": ep * p_hit, "ep_bytes": ep_bytes, "tp_bytes": tp_bytes,
            "dp_experts_bytes": dp_exp, "dp_rest_bytes": dp_rep, "dp_bytes": dp_exp + dp_rep,
            "ep_link": links["ep"], "tp_link": links["tp"],
            "dp_link": "net" if "net" in dp_links else ("nvlink" if dp_links else "-"),
            "ep_s": ep_s, "tp_s": tp_s, "dp_s": dp_s, "comm_s": ep_s + tp_s + dp_s, "best": False,
        })
    rows.sort(key=lambda r: (r["comm_s"], r["state_gb"], r["ep"], r["tp"]))
    for r in rows:
        if r["fits"]:
            r["best"] = True
            break
    return rows


# ---- output ------------------------------------------------------------------------------------

def format_table(rows, model, cluster):
    """The table the CLI prints (bytes in GB per GPU per step, times in ms)."""
    s = cluster.state_bytes_per_param(model)
    out = [
        f"# model {model.name}: {model.total_params / 1e9:.2f}e9 params ({model.expert_params / 1e9:.2f}e9 in "
        f"{model.moe_layers} x {model.experts} routed experts, {model.replicated_params / 1e9:.2f}e9 replicated); "
        f"L={model.layers} H={model.hidden} F={model.ffn} top-{model.topk} shared_ffn={model.shared_ffn}",
        f"# cluster: {cluster.gpus} GPUs, {cluster.gpus_per_node} per node, {cluster.mem_gb:g} GB each; NVLink "
        f"{cluster.nvlink_gbps:g} GB/s, network {cluster.net_gbps:g} GB/s per GPU",
        f"# {cluster.mode} step: global batch {cluster.batch} x {cluster.seq_len} tokens; {model.bytes_per_param:g} "
        f"bytes per weight/activation, {s:g} bytes of state per param"
        + (" (optimizer part sharded over data-parallel copies)" if cluster.shard_optimizer and cluster.training
           else "")
        + ("; forward + backward + gradient sync" if cluster.training else "; forward only"),
        "# memory and traffic per GPU per step (GB = 1e9 bytes); link: nvlink if the groups fit in a node, "
        "net otherwise; * = best that fits",
    ]
    head = (f"{'':1} {'layout':<9}{'ep':>4}{'tp':>4}{'dp':>4}{'tok/GPU':>10}{'weights':>9}{'state':>9}{'fits':>5}"
            f"{'fanout':>7}{'EP GB':>10} {'link':<6}{'TP GB':>10} {'link':<6}{'DP GB':>10} {'link':<6}{'comm ms':>10}")
    out.append(head)
    for r in rows:
        out.append(
            f"{'*' if r['best'] else ' ':1} {r['layout']:<9}{r['ep']:>4}{r['tp']:>4}{r['dp']:>4}"
            f"{r['tokens_per_gpu']:>10.0f}{r['weight_gb']:>9.2f}{r['state_gb']:>9.2f}{'yes' if r['fits'] else 'NO':>5}"
            f"{r['ep_fanout']:>7.2f}{r['ep_bytes'] / GB:>10.3f} {r['ep_link']:<6}{r['tp_bytes'] / GB:>10.3f} "
            f"{r['tp_link']:<6}{r['dp_bytes'] / GB:>10.3f} {r['dp_link']:<6}{r['comm_s'] * 1e3:>10.2f}")
    if not any(r["best"] for r in rows):
        out.append(f"# no layout fits in {cluster.mem_gb:g} GB per GPU")
    return "\n".join(out)


def to_json(rows, model, cluster):
    """The table and its inputs as a JSON-ready dict."""
    m = asdict(model)
    m.update(expert_params=model.expert_params, replicated_params=model.replicated_params,
             total_params=model.total_params)
    c = asdict(cluster)
    c["state_bytes_per_param"] = cluster.state_bytes_per_param(model)
    return {"model": m, "cluster": c, "gb": GB, "tp_allreduces_per_layer": TP_ALLREDUCES_PER_LAYER, "rows": rows}


def _matplotlib_figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("moe-ext plan --png needs matplotlib, which is not installed: pip install matplotlib") \
            from None
    return Figure


def write_png(rows, model, cluster, path):
    """Bar charts of state memory per GPU (with the memory limit) and of communication time per
    step split by kind, one bar per layout in the table's order. Needs matplotlib."""
    Figure = _matplotlib_figure()
    labels = [f"{'* ' if r['best'] else ''}{r['layout']}\n{r['ep']}x{r['tp']}x{r['dp']}" for r in rows]
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 0.6 * len(rows) + 2), 7.5), layout="constrained")
    mem, comm = fig.subplots(2, 1, sharex=True)
    mem.bar(x, [r["state_gb"] for r in rows], color=["tab:blue" if r["fits"] else "tab:red" for r in rows])
    mem.axhline(cluster.mem_gb, color="black", linestyle="--", linewidth=1, label=f"{cluster.mem_gb:g} GB per GPU")
    mem.set_ylabel("model state per GPU (GB)")
    mem.set_yscale("log")
    mem.legend(loc="upper right")
    mem.set_title(f"{model.name} on {cluster.gpus} GPUs ({cluster.mode}, global batch {cluster.batch} x "
                  f"{cluster.seq_len}); red: does not fit; * best that fits")
    bottom = np.zeros(len(rows))
    for key, label in (("ep_s", "EP all-to-all"), ("tp_s", "TP all-reduce"), ("dp_s", "DP gradient sync")):
        ms = np.array([r[key] * 1e3 for r in rows])
        comm.bar(x, ms, bottom=bottom, label=label)
        bottom += ms
    comm.set_ylabel("communication per step (ms)")
    comm.set_xticks(x, labels, rotation=60, fontsize=7)
    comm.set_xlabel("layout, ep x tp x dp (sorted by communication time)")
    comm.legend(loc="upper left")
    fig.savefig(path, dpi=110)


# ---- the `moe-ext plan` command ------------------------------------------------------------------

_MODEL_FLAGS = ("layers", "moe_layers", "hidden", "ffn", "experts", "topk", "shared_ffn", "dense_params",
                "bytes_per_param")
_REQUIRED_WITHOUT_PRESET = ("layers", "hidden", "ffn", "experts", "topk")


def add_plan_arguments(p):
    """The flags of `moe-ext plan` on the argparse (sub)parser p."""
    m = p.add_argument_group("model (a preset, optionally overridden, or every size given)")
    m.add_argument("--model", choices=sorted(PRESETS), help="preset architecture")
    m.add_argument("--layers", type=int, help="transformer layers")
    m.add_argument("--moe-layers", type=int, help="MoE layers among them (default: all)")
    m.add_argument("--hidden", type=int, help="hidden size H")
    m.add_argument("--ffn", type=int, help="one routed expert's FFN hidden size F")
    m.add_argument("--experts", type=int, help="routed experts per MoE layer E")
    m.add_argument("--topk", type=int, help="experts per token k")
    m.add_argument("--shared-ffn", type=int, help="total FFN width of the shared experts (default 0)")
    m.add_argument("--dense-params", type=float,
                   help="parameters outside the MoE blocks: attention, embeddings, norms, dense FFNs (default 0)")
    m.add_argument("--bytes-per-param", type=float, help="bytes per weight, gradient and activation (default 2)")
    c = p.add_argument_group("cluster and step")
    c.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    c.add_argument("--gpus-per-node", type=int, default=8, help="GPUs sharing NVLink (default 8)")
    c.add_argument("--mem-gb", type=float, default=80.0, help="memory per GPU, GB = 1e9 bytes (default 80)")
    c.add_argument("--nvlink-gbps", type=float, default=450.0, help="NVLink GB/s per GPU and direction (default 450)")
    c.add_argument("--net-gbps", type=float, default=50.0, help="network GB/s per GPU and direction (default 50)")
    c.add_argument("--batch", type=int, required=True, help="GLOBAL batch, sequences per step")
    c.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    c.add_argument("--optimizer-bytes-per-param", type=float,
                   help="model state per parameter, weights included (16: Adam mixed precision, 2: bf16 "
                        "inference); default 2 x bytes-per-param + 12 for train, bytes-per-param for infer")
    c.add_argument("--mode", choices=MODES, default="train",
                   help="train (default): forward + backward + gradient sync; infer: forward only")
    c.add_argument("--shard-optimizer", action="store_true",
                   help="train: split the optimizer state over the data-parallel copies (ZeRO-1)")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="write the table as JSON")
    o.add_argument("--png", metavar="PATH", help="write a bar chart of memory and communication time (matplotlib)")


def _flag(field):
    return "--" + field.replace("_", "-")


def specs_from_args(args, parser):
    """(ModelSpec, ClusterSpec) from parsed flags; bad values end in parser.error naming the flag."""
    given = {f: getattr(args, f) for f in _MODEL_FLAGS if getattr(args, f) is not None}
    try:
        if args.model is not None:
            base = {f.name: getattr(PRESETS[args.model], f.name) for f in fields(ModelSpec)}
            if "layers" in given and "moe_layers" not in given and base["moe_layers"] == base["layers"]:
                base["moe_layers"] = None  # all layers MoE in the preset: stays so with other --layers
            base.update(given)
            if given:
                base["name"] = f"{args.model} (modified: {', '.join(_flag(f) for f in given)})"
            model = ModelSpec(**base)
        else:
            missing = [_flag(f) for f in _REQUIRED_WITHOUT_PRESET if f not in given]
            if missing:
                parser.error(f"without --model, give the model's sizes; missing {', '.join(missing)}")
            model = ModelSpec(**given)
        cluster = ClusterSpec(gpus=args.gpus, batch=args.batch, seq_len=args.seq_len,
                              gpus_per_node=args.gpus_per_node, mem_gb=args.mem_gb, nvlink_gbps=args.nvlink_gbps,
                              net_gbps=args.net_gbps, optimizer_bytes_per_param=args.optimizer_bytes_per_param,
                              mode=args.mode, shard_optimizer=args.shard_optimizer)
    except PlanError as e:
        parser.error(f"{_flag(e.field)}: {e}")
    return model, cluster


def run_plan(args, parser):
    """`moe-ext plan`: prints the table; writes --json and --png when given. Returns 0."""
    model, cluster = specs_from_args(args, parser)
    if args.png:
        try:
            _matplotlib_figure()
        except RuntimeError as e:
            parser.error(str(e))
    rows = plan(model, cluster)
    print(format_table(rows, model, cluster))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(rows, model, cluster), f, indent=1)
        print(f"# wrote {args.json}")
    if args.png:
        write_png(rows, model, cluster, args.png)
        print(f"# wrote {args.png}")
    return 0
