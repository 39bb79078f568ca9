"""Load-based expert placement: how many replicas each expert gets and which ranks hold them.

A rank holds a fixed number of expert slots; an expert with r replicas has its tokens split
evenly over them, so each replica carries load / r. The goal is the smallest maximum rank load.

`split_then_pack` is the usual greedy (DeepSeek's EPLB approach): give the extra slots one at a
time to the expert with the largest load per replica, then pack the replicas heaviest first onto
the least-loaded rank with a free slot. Its weakness is that the replica sizes are fixed before
packing: with few slots per rank, pieces of ~0.6 of a rank's fair share cannot pair up well.
`rebalance` starts from that solution and improves the replica counts together with the
packing by local search on the most loaded rank: swap one of its replicas with a lighter one
elsewhere, or give one of its experts an extra replica taken from a lightly loaded replicated
expert. Then ranks are grouped into nodes so node loads are balanced too (hierarchical): the
rows of `holds` are ordered so that rank r is on node r // ranks_per_node, the node it has when
the placement is applied (MoE.apply_placement).
"""
import heapq
import numbers
from dataclasses import dataclass
from typing import List

import numpy as np


@dataclass
class Placement:
    replica_counts: np.ndarray  # [E] int64, >= 1
    holds: np.ndarray  # [R, E] bool: rank r holds a replica of expert e
    rank_node: np.ndarray  # [R] int64: node of each rank
    loads: np.ndarray  # [E] float64: the loads it was built for

    @property
    def rank_experts(self) -> List[List[int]]:
        """Global expert ids held by each rank, ascending."""
        return [np.nonzero(row)[0].tolist() for row in self.holds]

    def rank_loads(self, loads=None):
        loads = self.loads if loads is None else np.asarray(loads, dtype=np.float64)
        return self.holds.astype(np.float64) @ (loads / self.replica_counts)

    def node_loads(self, loads=None):
        return np.bincount(self.rank_node, weights=self.rank_loads(loads))

    def imbalance(self, loads=None):
        """(max / mean rank load, max / mean node load)."""
        rl, nl = self.rank_loads(loads), self.node_loads(loads)
        if rl.mean() == 0:  # no load at all: perfectly balanced
            return 1.0, 1.0
        return float(rl.max() / rl.mean()), float(nl.max() / nl.mean())


def _check(loads, num_ranks, num_replica_slots, ranks_per_node):
    loads = np.asarray(loads, dtype=np.float64)
    if loads.ndim != 1 or loads.size == 0 or not np.all(np.isfinite(loads)) or (loads < 0).any():
        raise ValueError("moe_ext.placement: loads must be a non-empty vector of finite values >= 0")
    for name, v in (("num_ranks", num_ranks), ("num_replica_slots", num_replica_slots),
                    ("ranks_per_node", ranks_per_node)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise ValueError(f"moe_ext.placement: {name} must be an int, got {v!r}")
    if num_ranks < 1 or num_replica_slots < 0:
        raise ValueError(f"moe_ext.placement: need num_ranks >= 1 and num_replica_slots >= 0, got "
                         f"{num_ranks} and {num_replica_slots}")
    if ranks_per_node < 1 or num_ranks % ranks_per_node:
        raise ValueError(f"moe_ext.placement: ranks_per_node={ranks_per_node} must divide num_ranks={num_ranks}")
    if num_replica_slots and loads.size + num_replica_slots > loads.size * num_ranks:
        raise ValueError("moe_ext.placement: more replicas than ranks to hold them (an expert has at most one "
                         "replica per rank)")
    # Slots per rank: as even as possible (the first ranks take the remainder).
    total = loads.size + num_replica_slots
    slots = np.full(num_ranks, total // num_ranks, dtype=np.int64)
    slots[: total % num_ranks] += 1
    return loads, slots


def _greedy_counts(loads, num_slots, num_ranks):
    """Extra replicas one at a time to the expert with the largest load per replica."""
    counts = np.ones(loads.size, dtype=np.int64)
    heap = [(-v, e) for e, v in enumerate(loads)]
    heapq.heapify(heap)
    for _ in range(num_slots - loads.size):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        if counts[e] < num_ranks:
            heapq.heappush(heap, (-loads[e] / counts[e], e))
    return counts


def _pack(loads, counts, slots):
    """Replicas heaviest first onto the least-loaded rank with a free slot and no copy yet."""
    R, E = slots.size, loads.size
    holds = np.zeros((R, E), dtype=bool)
    rank_load, used = np.zeros(R), np.zeros(R, dtype=np.int64)
    piece = loads / counts
    for e in np.argsort(-piece, kind="stable"):
        for _ in range(counts[e]):
            free = (used < slots) & ~holds[:, e]
            if not free.any():
                # Every rank with room already holds e (late in the packing the free slots can
                # gather on a few ranks). Make room: a full rank o without e hands one of its
                # experts b to a rank r with room, which lacks b: r holds e, so were all of o's
                # experts also on r, r would hold more than o's slots + 1 (slots differ by <= 1).
                r = int(np.argmin(np.where(used < slots, rank_load, np.inf)))
                o = int(np.argmin(np.where(holds[:, e], np.inf, rank_load)))
                b = int(np.nonzero(holds[o] & ~holds[r])[0][0])
                holds[o, b], holds[r, b] = False, True
                rank_load[o] -= piece[b]
                rank_load[r] += piece[b]
                used[o] -= 1
                used[r] += 1
                free = (used < slots) & ~holds[:, e]
            r = int(np.argmin(np.where(free, rank_load, np.inf)))
            holds[r, e] = True
            rank_load[r] += piece[e]
            used[r] += 1
    return holds


def _group_nodes(rank_load, ranks_per_node):
    """Ranks onto nodes, heaviest first onto the lightest node with room: balances node loads."""
    R = rank_load.size
    num_nodes = R // ranks_per_node
    node_load, fill = np.zeros(num_nodes), np.zeros(num_nodes, dtype=np.int64)
    rank_node = np.zeros(R, dtype=np.int64)
    for r in np.argsort(-rank_load, kind="stable"):
        n = int(np.argmin(np.where(fill < ranks_per_node, node_load, np.inf)))
        rank_node[r] = n
        node_load[n] += rank_load[r]
        fill[n] += 1
    return rank_node


def _order_by_node(loads, counts, holds, ranks_per_node):
    """Groups the ranks into nodes with balanced loads and reorders the rows of holds so that the
    node of rank r is r // ranks_per_node, as it is in a deployment (ExpertLayout reads the rows
    as EP ranks). Returns (holds, rank_node)."""
    rank_node = _group_nodes(holds.astype(np.float64) @ (loads / counts), ranks_per_node)
    order = np.argsort(rank_node, kind="stable")
    return holds[order], rank_node[order]


def _best_move(loads, counts, holds):
    """The move that most lowers the most loaded rank, or None at a local optimum."""
    piece = loads / counts
    rank_load = holds.astype(np.float64) @ piece
    m = int(np.argmax(rank_load))
    cur = rank_load[m]
    best_val, best = cur * (1 - 1e-12), None
    others = np.ones(rank_load.size, dtype=bool)
    others[m] = False
    for a in np.nonzero(holds[m])[0]:
        # Swap a (on m) with a lighter b on rank o: m loses d, o gains d.
        d = piece[a] - piece
        cand_b = np.nonzero((d > 0) & ~holds[m])[0]
        if cand_b.size:
            ok = holds[:, cand_b] & ~holds[:, a][:, None] & others[:, None]
            val = np.where(ok, np.maximum(rank_load[:, None] + d[cand_b], cur - d[cand_b]), np.inf)
            o, j = np.unravel_index(int(np.argmin(val)), val.shape)
            if val[o, j] < best_val:
                best_val, best = val[o, j], ("swap", m, int(a), int(o), int(cand_b[j]))
        # Re-split: a gets one more replica on rank x, taking the slot of a replica of b there.
        if counts[a] >= holds.shape[0]:
            continue
        grow_a = loads[a] / (counts[a] + 1) - piece[a]
        for b in np.nonzero(counts >= 2)[0]:
            if b == a:
                continue
            xs = np.nonzero(holds[:, b] & ~holds[:, a])[0]
            if not xs.size:
                continue
            shrink_b = loads[b] / (counts[b] - 1) - piece[b]
            base = rank_load + holds[:, a] * grow_a + holds[:, b] * shrink_b
            # NOTE: rank x ends with base[x] - (piece of b there, now larger) + (new piece of a).
            at_x = base[xs] - loads[b] / (counts[b] - 1) + loads[a] / (counts[a] + 1)
            # Max over ranks for each choice of x: x takes at_x, the others keep base.
            top = np.argsort(-base, kind="stable")[:2]
            second = base[top[1]] if top.size > 1 else -np.inf
            vals = np.maximum(np.where(xs == top[0], second, base[top[0]]), at_x)
            i = int(np.argmin(vals))
            if vals[i] < best_val:
                best_val, best = vals[i], ("split", int(a), int(b), int(xs[i]))
    return best


def _apply(move, counts, holds):
    if move[0] == "swap":
        _, m, a, o, b = move
        holds[m, a], holds[m, b], holds[o, b], holds[o, a] = False, True, False, True
    else:
        _, a, b, x = move
        holds[x, b], holds[x, a] = False, True
        counts[a] += 1
        counts[b] -= 1


def split_then_pack(loads, num_ranks, num_replica_slots, ranks_per_node=1):
    """The greedy baseline: replica counts first (largest load per replica), then packing."""
    loads, slots = _check(loads, num_ranks, num_replica_slots, ranks_per_node)
    counts = _greedy_counts(loads, int(slots.sum()), num_ranks)
    holds = _pack(loads, counts, slots)
    holds, rank_node = _order_by_node(loads, counts, holds, ranks_per_node)
    return Placement(counts, holds, rank_node, loads)


def _local_search(loads, counts, holds, max_moves):
    for _ in range(max_moves):
        move = _best_move(loads, counts, holds)
        if move is None:
            break
        _apply(move, counts, holds)
    return float((holds.astype(np.float64) @ (loads / counts)).max())


def rebalance(loads, num_ranks, num_replica_slots, ranks_per_node=1, restarts=8, max_moves=10000, seed=0):
    """Replica counts and placement minimising the maximum rank load, then nodes balanced.

    loads: [E] per-expert load (e.g. a running average of tokens_per_expert); num_ranks R;
    num_replica_slots: extra slots beyond one per expert (ranks hold (E + slots) / R experts
    each, the first ranks one more when it does not divide); ranks_per_node groups ranks into
    nodes. Local search runs from the greedy start and from `restarts - 1` starts whose replica
    counts come from jittered loads (seeded: the result is deterministic); the best is kept.
    Returns a Placement (replica_counts, holds [R, E], rank_node).
    """
    loads, slots = _check(loads, num_ranks, num_replica_slots, ranks_per_node)
    rng = np.random.default_rng(seed)
    best = None
    for i in range(max(1, restarts)):
        jittered = loads if i == 0 else loads * np.clip(1 + 0.1 * rng.standard_normal(loads.size), 0.5, None)
        counts = _greedy_counts(jittered, int(slots.sum()), num_ranks)
        holds = _pack(loads, counts, slots)
        peak = _local_search(loads, counts, holds, max_moves)
        if best is None or peak < best[0]:
            best = (peak, counts, holds)
    _, counts, holds = best
    holds, rank_node = _order_by_node(loads, counts, holds, ranks_per_node)
    return Placement(counts, holds, rank_node, loads)


def zipf_loads(num_experts, s=1.2, total=1.0, seed=0):
    """Zipf(s) loads over experts in a random order (for tests and the planner)."""
    rng = np.random.default_rng(seed)
    loads = 1.0 / np.arange(1, num_experts + 1) ** s
    return rng.permutation(loads / loads.sum() * total)
