"""The layout planner (moe_ext.plan, `moe-ext plan`): hand-computed numbers, presets, layouts,
the routing fan-out against exact counts and against the bytes a 2-rank gloo dispatch / combine
sent (counted by wrapping torch.distributed.all_to_all_single), the CLI."""
import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

import moe_ext
from moe_ext import plan as P
from moe_ext.cli import main

from dist_utils import run_world

# ---- a tiny model on 4 GPUs (2 per node), every number written by hand ----------------------------
# P_experts    = moe_layers * E * 3 * H * F = 2 * 4 * 3 * 4 * 8                      = 768
# P_replicated = dense + moe_layers * (3 * H * shared_ffn + E * H) = 100 + 2 * (24 + 16) = 180
# Global tokens B * S = 8 * 16 = 128; bytes 2; state 16 bytes/param; mem 5000 bytes per GPU.
# Training: passes = 2. Bandwidths: NVLink 100e9, network 10e9 bytes/s.
TINY = dict(layers=2, moe_layers=2, hidden=4, ffn=8, experts=4, topk=2, shared_ffn=2, dense_params=100,
            bytes_per_param=2)
TINY_CLUSTER = dict(gpus=4, gpus_per_node=2, mem_gb=5000 / 1e9, nvlink_gbps=100, net_gbps=10, batch=8, seq_len=16,
                    optimizer_bytes_per_param=16)
NV, NET = 100e9, 10e9

# (ep, tp, dp): params per GPU, state bytes, fits, EP bytes, TP bytes, DP bytes, links (ep, tp, dp), comm seconds
EXPECTED = {
    # EP4: T = 128 / 4 = 32; params 768/4 + 180 = 372; p = 1 - C(3,2)/C(4,2) = 1/2;
    # EP = 2 passes * 2 layers * 2 * 32 * 4 * 2 bytes * (4 - 1) * 1/2 = 3072; DP (rest over 4) = 2*180*2*3/4 = 540
    (4, 1, 1): (372, 372 * 16, False, 3072, 0, 540, ("net", "-", "net"), (3072 + 540) / NET),
    # EP2xTP2: T = 128 / 2 = 64; params 768/4 + 180/2 = 282; p = 1 - C(2,2)/C(4,2) = 5/6;
    # EP = 2*2*2*64*4*2*1*5/6 = 4096*5/6; TP (issue 9's 2 x B x S x H x L: one all-reduce per layer and
    # pass) = 2 passes * 2 layers * 2 * 64*4*2 * (1/2) = 2048;
    # DP (rest over ep*dp = 2) = 2*90*2*1/2 = 180. Links: tp {0,1} nvlink, ep {0,2} net, dp {0,2} net.
    (2, 2, 1): (282, 282 * 16, True, 4096 * 5 / 6, 2048, 180, ("net", "nvlink", "net"),
                2048 / NV + (4096 * 5 / 6 + 180) / NET),
    # EP2xDP2: T = 32; params 384 + 180 = 564; EP = 2*2*2*32*4*2*1*5/6 = 2048*5/6 (ep {0,1}: nvlink);
    # DP = experts over dp 2: 2*384*2*1/2 = 768 + rest over 4: 540 = 1308 (net)
    (2, 1, 2): (564, 564 * 16, False, 2048 * 5 / 6, 0, 1308, ("nvlink", "-", "net"), 2048 * 5 / 6 / NV + 1308 / NET),
    # TP2xDP2: T = 64; params 384 + 90 = 474; TP = 2*2*2*(1/2)*64*4*2 = 2048 (nvlink);
    # DP = 2*384*2*1/2 + 2*90*2*1/2 = 768 + 180 = 948 (net)
    (1, 2, 2): (474, 474 * 16, False, 0, 2048, 948, ("-", "nvlink", "net"), 2048 / NV + 948 / NET),
    # TP4: T = 128; params 192 + 45 = 237; TP = 2*2*2*(3/4)*128*4*2 = 6144 over 2 nodes (net)
    (1, 4, 1): (237, 237 * 16, True, 0, 6144, 0, ("-", "net", "-"), 6144 / NET),
    # DP4: T = 32; params 948; DP = 2*948*2*3/4 = 2844 (net)
    (1, 1, 4): (948, 948 * 16, False, 0, 0, 2844, ("-", "-", "net"), 2844 / NET),
}


def _rel(a, b):
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def test_tiny_model_by_hand():
    model, cluster = P.ModelSpec(**TINY), P.ClusterSpec(**TINY_CLUSTER)
    assert model.expert_params == 768 and model.replicated_params == 180
    assert cluster.state_bytes_per_param(model) == 16
    rows = P.plan(model, cluster)
    assert {(r["ep"], r["tp"], r["dp"]) for r in rows} == set(EXPECTED)  # no EPxTPxDP: 4 = 2 * 2
    for r in rows:
        params, state, fits, ep_b, tp_b, dp_b, links, comm = EXPECTED[(r["ep"], r["tp"], r["dp"])]
        assert _rel(r["params_per_gpu"], params)
        assert _rel(r["weight_gb"] * 1e9, params * 2) and _rel(r["state_gb"] * 1e9, state)
        assert r["fits"] == fits
        assert _rel(r["ep_bytes"], ep_b) and _rel(r["tp_bytes"], tp_b) and _rel(r["dp_bytes"], dp_b)
        assert (r["ep_link"], r["tp_link"], r["dp_link"]) == links
        assert _rel(r["comm_s"], comm)
    # Sorted by communication time: TPxDP 1.1528e-7, EPxDP 1.4787e-7, DP 2.844e-7, EP 3.612e-7,
    # EPxTP 3.7981e-7, TP 6.144e-7; the best that fits is EPxTP.
    assert [r["layout"] for r in rows] == ["TPxDP", "EPxDP", "DP", "EP", "EPxTP", "TP"]
    assert [r["layout"] for r in rows if r["best"]] == ["EPxTP"]


def test_tiny_model_inference_and_sharded_optimizer():
    model = P.ModelSpec(**TINY)
    infer = P.ClusterSpec(**{**TINY_CLUSTER, "optimizer_bytes_per_param": None, "mode": "infer"})
    assert infer.state_bytes_per_param(model) == 2  # weights only
    r = {(x["ep"], x["tp"], x["dp"]): x for x in P.plan(model, infer)}[(2, 2, 1)]
    # one pass: half the training EP and TP bytes; no gradient sync
    assert _rel(r["ep_bytes"], 2048 * 5 / 6) and _rel(r["tp_bytes"], 1024) and r["dp_bytes"] == 0
    assert _rel(r["state_gb"] * 1e9, 282 * 2)
    # training default: 2 * 2 + 12 = 16 bytes per parameter
    assert P.ClusterSpec(**{**TINY_CLUSTER, "optimizer_bytes_per_param": None}).state_bytes_per_param(model) == 16
    # ZeRO-1: EP2xDP2 keeps 4 bytes (weights, grads) whole and splits the other 12 over the copies:
    # experts 384 * (4 + 12/2) + rest 180 * (4 + 12/4) = 3840 + 1260
    sharded = P.ClusterSpec(**{**TINY_CLUSTER, "shard_optimizer": True})
    r = {(x["ep"], x["tp"], x["dp"]): x for x in P.plan(model, sharded)}[(2, 1, 2)]
    assert _rel(r["state_gb"] * 1e9, 3840 + 1260) and r["fits"] is False
    assert _rel(r["dp_bytes"], 1308)  # reduce-scatter + all-gather: the same bytes


def test_tp_bytes_are_the_issues_formula():
    # Issue 9's TP all-reduce 2 x B x S x H x L: one ring all-reduce of the [T, H] activations per
    # layer and pass, B x S = T the tokens of one tp group, times bytes and the ring's (tp - 1) / tp.
    # TP8, L = 3, H = 16, 4 x 32 = 128 tokens, 2 bytes: 2 * 128 * 16 * 3 * 2 * 7/8 = 21504 per pass.
    model = P.ModelSpec(layers=3, moe_layers=1, hidden=16, ffn=8, experts=8, topk=2)
    for mode, passes in (("infer", 1), ("train", 2)):
        rows = P.plan(model, P.ClusterSpec(gpus=8, batch=4, seq_len=32, mode=mode))
        r = next(r for r in rows if (r["ep"], r["tp"], r["dp"]) == (1, 8, 1))
        assert r["tp_bytes"] == passes * 21504 == passes * 2 * 4 * 32 * 16 * 3 * 2 * 7 / 8
        assert all(r["tp_bytes"] == 0 for r in rows if r["tp"] == 1)
    assert P.TP_ALLREDUCES_PER_LAYER == 1 and P.to_json(rows, model, P.ClusterSpec(gpus=8, batch=4, seq_len=32))[
        "tp_allreduces_per_layer"] == 1


# ---- layouts and presets ----------------------------------------------------------------------------

def test_layouts_that_cannot_exist_are_not_listed():
    rows = P.plan(P.ModelSpec(**{**TINY, "experts": 6}), P.ClusterSpec(**TINY_CLUSTER))
    assert {(r["ep"], r["tp"], r["dp"]) for r in rows} == {(1, 1, 4), (1, 2, 2), (1, 4, 1), (2, 1, 2), (2, 2, 1)}
    assert sorted({r["ep"] for r in P.plan(P.ModelSpec(**{**TINY, "experts": 8}),
                                           P.ClusterSpec(**{**TINY_CLUSTER, "gpus": 12}))}) == [1, 2, 4]
    got = P.layouts(8, 8)
    assert sorted(got) == sorted((e, t, 8 // (e * t)) for e in (1, 2, 4, 8) for t in (1, 2, 4, 8) if 8 % (e * t) == 0)
    assert {P.layout_name(*lay) for lay in got} == {"TP", "EP", "DP", "EPxTP", "EPxDP", "TPxDP", "EPxTPxDP"}
    assert P.layout_name(1, 1, 1) == "single" and [r["layout"] for r in P.plan(
        P.ModelSpec(**TINY), P.ClusterSpec(**{**TINY_CLUSTER, "gpus": 1}))] == ["single"]


def test_links_follow_the_node_boundaries():
    model = P.ModelSpec(layers=1, hidden=8, ffn=8, experts=16, topk=2)
    rows = {(r["ep"], r["tp"], r["dp"]): r for r in P.plan(model, P.ClusterSpec(gpus=16, batch=1, seq_len=16))}
    assert (rows[(8, 2, 1)]["ep_link"], rows[(8, 2, 1)]["tp_link"]) == ("net", "nvlink")  # ep spans 16 ranks
    assert (rows[(4, 2, 2)]["ep_link"], rows[(4, 2, 2)]["dp_link"]) == ("nvlink", "net")  # ep spans 8
    assert rows[(1, 16, 1)]["tp_link"] == "net" and rows[(1, 8, 2)]["tp_link"] == "nvlink"


@pytest.mark.parametrize("name,total", [("mixtral-8x7b", 46.7e9), ("deepseek-v3", 671e9), ("qwen3-moe", 235e9)])
def test_presets(name, total):
    model = P.PRESETS[name]
    assert abs(model.total_params / total - 1) < 0.002  # the published sizes
    rows = P.plan(model, P.ClusterSpec(gpus=64, batch=64, seq_len=4096))
    assert rows and all(model.experts % r["ep"] == 0 and r["ep"] * r["tp"] * r["dp"] == 64 for r in rows)
    assert [r["comm_s"] for r in rows] == sorted(r["comm_s"] for r in rows)
    assert sum(r["best"] for r in rows) == (1 if any(r["fits"] for r in rows) else 0)
    assert all(math.isfinite(r["comm_s"]) and r["state_gb"] > 0 for r in rows)


def test_bad_specs_name_the_field():
    with pytest.raises(P.PlanError, match="topk") as e:
        P.ModelSpec(**{**TINY, "topk": 5})
    assert e.value.field == "topk"
    with pytest.raises(P.PlanError, match="gpus_per_node"):
        P.ClusterSpec(**{**TINY_CLUSTER, "gpus_per_node": 0})
    with pytest.raises(P.PlanError, match="mode"):
        P.ClusterSpec(**{**TINY_CLUSTER, "mode": "serve"})
    for field, bad in (("moe_layers", 1.5), ("shared_ffn", 1.5), ("layers", True), ("dense_params", math.inf)):
        with pytest.raises(P.PlanError, match=field):
            P.ModelSpec(**{**TINY, field: bad})
    for field in ("mem_gb", "nvlink_gbps", "net_gbps"):
        with pytest.raises(P.PlanError, match=field):
            P.ClusterSpec(**{**TINY_CLUSTER, field: math.inf})


# ---- the routing fan-out against exact counts -------------------------------------------------------

def test_fanout_formula():
    for E, k in ((8, 2), (16, 4), (256, 8)):
        assert P.routing_fanout(E, k, 1) == 1.0  # everything local: one destination
        assert math.isclose(P.routing_fanout(E, k, E), k)  # one expert per rank: k destinations
    for E, k, ep in ((6, 3, 3), (8, 3, 4), (12, 4, 6), (8, 2, 2)):  # brute force over every k-subset
        per = E // ep
        counts = [len({e // per for e in s}) for s in itertools.combinations(range(E), k)]
        assert math.isclose(P.routing_fanout(E, k, ep), sum(counts) / len(counts))


def _uniform_idx(rng, tokens, num_experts, k):
    """[tokens, k] distinct experts per token, every k-subset equally likely."""
    return np.argpartition(rng.random((tokens, num_experts)), k, axis=1)[:, :k]


@pytest.mark.parametrize("num_experts,k,ep", [(64, 6, 8), (8, 2, 8), (256, 8, 32), (16, 4, 2)])
def test_uniform_expectation_matches_exact_count(num_experts, k, ep):
    rng = np.random.default_rng(num_experts * 1000 + k * 10 + ep)
    tokens, hidden, nbytes = 4096, 16, 2
    idx = [_uniform_idx(rng, tokens, num_experts, k) for _ in range(ep)]
    exact = sum(P.ep_dispatch_bytes(tokens, hidden, nbytes, idx, num_experts, ep))
    expected = ep * P.expected_dispatch_bytes(tokens, hidden, nbytes, num_experts, k, ep)
    assert abs(exact / expected - 1) < 0.02
    # the planner's EP column is that expectation, times 2 (dispatch + combine), MoE layers and passes
    model = P.ModelSpec(layers=3, moe_layers=2, hidden=hidden, ffn=8, experts=num_experts, topk=k)
    cluster = P.ClusterSpec(gpus=ep, batch=ep * tokens // 128, seq_len=128, mode="infer")
    row = next(r for r in P.plan(model, cluster) if r["ep"] == ep)
    assert math.isclose(row["ep_bytes"], 2 * 2 * P.expected_dispatch_bytes(tokens, hidden, nbytes, num_experts, k, ep))


def test_ep_dispatch_bytes_by_hand():
    # 4 experts on 2 ranks (0, 1 | 2, 3); rank 0's tokens: {0,1} stays, {0,2} crosses once, {2,3} crosses
    # once (two experts, one row), {-1,3} crosses once; rank 1's: {2,3} stays, {1,-1} crosses, {-1,-1} nothing.
    idx = [np.array([[0, 1], [0, 2], [2, 3], [-1, 3]]), torch.tensor([[2, 3], [1, -1], [-1, -1]])]
    assert P.ep_dispatch_bytes([4, 3], 10, 2, idx, 4, 2) == [3 * 10 * 2, 1 * 10 * 2]
    # Fractional bytes per element (4-bit rows) are not truncated; numpy ints are ints.
    assert P.ep_dispatch_bytes([np.int64(4), 3], 10, 0.5, idx, 4, 2) == [3 * 10 * 0.5, 1 * 10 * 0.5]
    with pytest.raises(ValueError, match="ep=3"):
        P.ep_dispatch_bytes(4, 10, 2, idx + [idx[0]], 4, 3)
    with pytest.raises(ValueError, match="rank 1"):
        P.ep_dispatch_bytes([4, 4], 10, 2, idx, 4, 2)


class _SentBytes:
    """Counting wrapper of torch.distributed.all_to_all_single, installed inside a spawned rank:
    adds up the bytes this rank sends to the OTHER ranks of the group (its own split is a local
    copy) over every call, whatever the tensor (headers and expert ids included), then calls the
    real collective."""

    def __init__(self, real):
        self.real, self.sent = real, 0

    def __call__(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        world, me = dist.get_world_size(group), dist.get_rank(group)
        splits = list(input_split_sizes) if input_split_sizes else [input.shape[0] // world] * world
        self.sent += (sum(splits) - splits[me]) * math.prod(input.shape[1:]) * input.element_size()
        return self.real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)


def _moved(counter, idx, hidden, num_experts):
    """Bytes sent by one bfloat16 dispatch, its combine and their backward (through identity
    experts), as the all_to_all_single wrapper counted them: {stage: bytes}."""
    k = idx.shape[1]
    x = torch.randn(idx.shape[0], hidden).to(torch.bfloat16).requires_grad_()
    w = torch.rand(idx.shape[0], k, requires_grad=True)
    out = {}
    counter.sent = 0
    recv_x, _, handle = moe_ext.dispatch(x, idx, w, num_experts, backend="gloo")
    out["dispatch"], counter.sent = counter.sent, 0
    y = moe_ext.combine(recv_x, handle)
    out["combine"], counter.sent = counter.sent, 0
    y.float().sum().backward()
    out["backward"] = counter.sent
    return out


def _dispatch_bytes_worker(rank, world, idx_per_rank, num_experts, hidden):
    """Dispatches this rank's tokens (idx_per_rank[rank], nested lists [T_r, k]) with hidden sizes
    H, 2H and 3H, counting what all_to_all_single sent; returns {stage: [bytes at H, 2H, 3H]}."""
    counter = _SentBytes(dist.all_to_all_single)
    dist.all_to_all_single = counter
    try:
        idx = torch.tensor(idx_per_rank[rank], dtype=torch.int64).view(-1, len(idx_per_rank[rank][0]))
        runs = [_moved(counter, idx, m * hidden, num_experts) for m in (1, 2, 3)]
    finally:
        dist.all_to_all_single = counter.real
    return {stage: [r[stage] for r in runs] for stage in runs[0]}


def _token_bytes(moved):
    """The part of the bytes sent that grows with the hidden size: the token rows at H (the bytes
    at 2H minus those at H); the rest (header rows, expert ids, weights) does not depend on H."""
    at_h, at_2h, at_3h = moved
    assert at_3h - at_2h == at_2h - at_h, f"bytes sent are not linear in the hidden size: {moved}"
    return at_2h - at_h


def _all_pairs_routing():
    """E = 4 experts (rank 0: 0, 1; rank 1: 2, 3), k = 2, each rank's 18 tokens every one of the
    C(4, 2) = 6 pairs three times (rank 1 in reverse order): uniform routing exactly, so the
    planner's expectation is an exact count."""
    pairs = [list(s) for s in itertools.combinations(range(4), 2)] * 3
    return [pairs, pairs[::-1]]


def _random_routing(seed, tokens, k, num_experts):
    """Random experts with repeats (several slots of a token on one rank) and 20% unrouted (-1) slots."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in tokens:
        idx = torch.randint(num_experts, (t, k), generator=g)
        idx[torch.rand(t, k, generator=g) < 0.2] = -1
        out.append(idx.tolist())
    return out


def test_ep_bytes_equal_what_a_gloo_dispatch_sent():
    """The bytes a real gloo dispatch / combine sent (counted by wrapping all_to_all_single in each
    rank), against the planner: its EP number, its expectation and its exact count, and by hand."""
    H, nbytes = 8, 2  # bfloat16 rows
    cases = [("all pairs", _all_pairs_routing(), 4), ("random", _random_routing(1234, [37, 53], 3, 6), 6)]
    results = {}
    for name, routing, num_experts in cases:
        results[name] = run_world(_dispatch_bytes_worker, 2, routing, num_experts, H, timeout_s=120)

    # By hand, all pairs: from each rank 15 of the 18 tokens have an expert on the other rank (every
    # pair but the rank's own one), 15 rows * 8 * 2 bytes = 240 per dispatch; the combine returns one
    # row per slot: 18 of the other rank's 36 slots live here, 18 * 8 * 2 = 288.
    T, k, E, W = 18, 2, 4, 2
    p = P.rank_hit_probability(E, k, W)
    assert math.isclose(p, 5 / 6)
    assert math.isclose(P.expected_dispatch_bytes(T, H, nbytes, E, k, W), 240)
    assert P.ep_dispatch_bytes(T, H, nbytes, _all_pairs_routing(), E, W) == [240, 240]
    model = P.ModelSpec(layers=1, hidden=H, ffn=8, experts=E, topk=k, bytes_per_param=nbytes)
    rows = {mode: next(r for r in P.plan(model, P.ClusterSpec(gpus=W, batch=2, seq_len=T, mode=mode)) if r["ep"] == W)
            for mode in ("infer", "train")}
    assert rows["infer"]["tokens_per_gpu"] == T
    assert math.isclose(rows["infer"]["ep_bytes"], 2 * T * H * nbytes * (W - 1) * p)  # = 480: 2 x 240
    assert math.isclose(rows["train"]["ep_bytes"], 2 * rows["infer"]["ep_bytes"])
    for rank, moved in enumerate(results["all pairs"]):
        sent = {stage: _token_bytes(m) for stage, m in moved.items()}
        # The dispatch moves exactly the planner's half of the EP bytes (dispatch + combine).
        assert sent["dispatch"] == 240 == rows["infer"]["ep_bytes"] / 2, (rank, sent)
        # moe_ext.combine returns one row per kept slot, T * k * (W - 1) / W of them, not one per
        # (token, destination) as the planner assumes: k / (W * p) = 1.2 times its half here.
        assert sent["combine"] == T * k * (W - 1) // W * H * nbytes == 288, (rank, sent)
        assert math.isclose(sent["combine"], rows["infer"]["ep_bytes"] / 2 * k / (W * p))
        # The backward moves the same rows again (the planner's passes = 2): the combine's gradient
        # once per (token, destination), the dispatch's once per slot.
        assert sent["backward"] == sent["dispatch"] + sent["combine"], (rank, sent)

    # Random routing with repeated experts and unrouted slots: the exact count of the planner.
    routing, E = cases[1][1], cases[1][2]
    tokens = [len(r) for r in routing]
    counted = P.ep_dispatch_bytes(tokens, H, nbytes, routing, E, W)
    for rank, moved in enumerate(results["random"]):
        sent = {stage: _token_bytes(m) for stage, m in moved.items()}
        assert sent["dispatch"] == counted[rank] > 0, (rank, sent, counted)
        # One row back per slot of the other rank's tokens on this rank's experts.
        slots_here = int((np.asarray(routing[1 - rank]) // (E // W) == rank).sum())
        assert sent["combine"] == slots_here * H * nbytes, (rank, sent, slots_here)
        assert sent["backward"] == sent["dispatch"] + sent["combine"], (rank, sent)


# ---- the command line -----------------------------------------------------------------------------

CLI = ["plan", "--gpus", "16", "--batch", "32", "--seq-len", "2048"]


def test_cli_preset_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(CLI + ["--model", "mixtral-8x7b", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mixtral-8x7b" in text and "EPxTP" in text and str(out) in text
    data = json.loads(out.read_text())
    assert data["model"]["experts"] == 8 and data["cluster"]["gpus"] == 16
    assert len(data["rows"]) == len(P.layouts(16, 8)) and sum(r["best"] for r in data["rows"]) == 1
    assert data["rows"] == P.plan(P.PRESETS["mixtral-8x7b"], P.ClusterSpec(gpus=16, batch=32, seq_len=2048))


def test_cli_explicit_numbers_and_overrides(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--gpus", "4", "--gpus-per-node", "2", "--mem-gb", str(5000 / 1e9), "--nvlink-gbps", "100",
                 "--net-gbps", "10", "--batch", "8", "--seq-len", "16", "--optimizer-bytes-per-param", "16",
                 "--layers", "2", "--hidden", "4", "--ffn", "8", "--experts", "4", "--topk", "2", "--shared-ffn", "2",
                 "--dense-params", "100", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["layout"] for r in rows] == ["TPxDP", "EPxDP", "DP", "EP", "EPxTP", "TP"]
    assert all(_rel(r["comm_s"], EXPECTED[(r["ep"], r["tp"], r["dp"])][-1]) for r in rows)
    assert main(CLI + ["--model", "deepseek-v3", "--moe-layers", "10", "--mode", "infer", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["model"]["moe_layers"] == 10 and "--moe-layers" in data["model"]["name"]
    assert all(r["dp_bytes"] == 0 for r in data["rows"])
    capsys.readouterr()


def test_cli_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plan.png"
    assert main(CLI + ["--model", "qwen3-moe", "--png", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()


def test_cli_png_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` fail
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as e:
        main(CLI + ["--model", "qwen3-moe", "--png", str(tmp_path / "plan.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--png" in err and "pip install matplotlib" in err


@pytest.mark.parametrize("argv,flag", [
    (CLI + ["--model", "mixtral-8x7b", "--gpus", "0"], "--gpus"),
    (CLI + ["--model", "mixtral-8x7b", "--gpus-per-node", "0"], "--gpus-per-node"),
    (CLI + ["--model", "mixtral-8x7b", "--mem-gb", "-1"], "--mem-gb"),
    (CLI + ["--model", "mixtral-8x7b", "--net-gbps", "0"], "--net-gbps"),
    (CLI + ["--model", "mixtral-8x7b", "--moe-layers", "40"], "--moe-layers"),
    (CLI + ["--model", "mixtral-8x7b", "--topk", "9"], "--topk"),
    (CLI + ["--model", "mixtral-8x7b", "--optimizer-bytes-per-param", "0"], "--optimizer-bytes-per-param"),
    (CLI + ["--model", "gpt-5"], "--model"),
    (CLI + ["--layers", "2", "--ffn", "8", "--experts", "4", "--topk", "2"], "--hidden"),
    (["plan", "--model", "mixtral-8x7b", "--gpus", "8", "--seq-len", "128"], "--batch"),
    (CLI + ["--model", "mixtral-8x7b", "--batch", "two"], "--batch"),
])
def test_cli_bad_arguments_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_python_dash_m(tmp_path):
    # From an empty directory, so the installed package runs (not a source tree without its extension).
    argv = ["plan", "--model", "qwen3-moe", "--gpus", "8", "--batch", "8", "--seq-len", "1024", "--mode", "infer"]
    res = subprocess.run([sys.executable, "-m", "moe_ext"] + argv, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr
    assert "qwen3-moe" in res.stdout and "forward only" in res.stdout
