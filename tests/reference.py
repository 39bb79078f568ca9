"""Plain-PyTorch float64 references, written independently of the C++ ops (no moe_ext imports)."""
import math

import torch


def stable_topk(values, k):
    """Top-k along the last dim, larger first, ties to the lower index (stable sort)."""
    keys = torch.where(torch.isnan(values), torch.full_like(values, -math.inf), values)
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices[..., :k]


def gating(logits, k, score="softmax", renormalize=True, expert_bias=None, num_groups=None, topk_groups=None,
           capacity_factor=None, noise=None, seq_len=None):
    """Returns dict(weights, idx, positions, tokens_per_expert, aux_loss, seq_aux_loss, z_loss), float64."""
    l = logits.double()
    if noise is not None:
        l = l + noise.double()
    T, E = l.shape
    s = torch.softmax(l, -1) if score == "softmax" else torch.sigmoid(l)
    pnorm = s if score == "softmax" else s / s.sum(-1, keepdim=True)
    sel = s + (expert_bias.double() if expert_bias is not None else 0)
    if num_groups:
        gsize = E // num_groups
        top2 = torch.sort(sel.view(T, num_groups, gsize), -1, descending=True).values[..., : min(2, gsize)]
        gscore = top2.sum(-1)
        best = stable_topk(gscore, topk_groups)
        allowed = torch.zeros(T, num_groups, dtype=torch.bool)
        allowed.scatter_(1, best, True)
        sel = sel.masked_fill(~allowed.repeat_interleave(gsize, 1), -math.inf)
    idx = stable_topk(sel, k)
    w = s.gather(1, idx)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    routed = torch.bincount(idx.flatten(), minlength=E).double()

    # Capacity in (token, slot) order: position = number of earlier slots with the same expert.
    flat = idx.flatten()
    onehot = torch.nn.functional.one_hot(flat, E) if T > 0 else torch.zeros(0, E, dtype=torch.long)
    pos = (onehot.cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1) if T > 0 else flat.clone()
    if capacity_factor:
        cap = max(1, math.ceil(capacity_factor * T * k / E - 1e-9))
        keep = pos < cap
    else:
        keep = torch.ones_like(flat, dtype=torch.bool)
    idx_out = torch.where(keep, flat, -1).view(T, k)
    pos_out = torch.where(keep, pos, -1).view(T, k)
    w = torch.where(keep.view(T, k), w, torch.zeros_like(w))
    tpe = torch.bincount(flat[keep], minlength=E)

    if T > 0:
        aux = E * ((routed / (T * k)) * pnorm.mean(0)).sum()
        z = (torch.logsumexp(l, -1) ** 2).mean()
    else:
        aux = z = torch.zeros((), dtype=torch.float64)
    seq_aux = torch.zeros((), dtype=torch.float64)
    if seq_len and T > 0:
        terms = []
        for s0 in range(0, T, seq_len):
            seg = idx[s0:s0 + seq_len].flatten()
            f = torch.bincount(seg, minlength=E).double() / (seq_len * k)
            terms.append(E * (f * pnorm[s0:s0 + seq_len].mean(0)).sum())
        seq_aux = torch.stack(terms).mean()
    return dict(weights=w, idx=idx_out, positions=pos_out, tokens_per_expert=tpe, aux_loss=aux,
                seq_aux_loss=seq_aux, z_loss=z)


def permute(x, idx, num_experts, pad_to=1, capacity=None):
    """Expert-major rows (token order inside an expert), padded segments. Returns (x_perm, row_map, sizes)."""
    T, k = idx.shape
    idx = idx.long()
    row_map = torch.full((T, k), -1, dtype=torch.long)
    blocks, sizes, start = [], [], 0
    for e in range(num_experts):
        slots = (idx.flatten() == e).nonzero().flatten()  # (token, slot) order
        if capacity is not None:
            slots = slots[:capacity]
        n = len(slots)
        seg = -(-n // pad_to) * pad_to
        block = torch.zeros((seg,) + tuple(x.shape[1:]), dtype=x.dtype)
        if n:
            block[:n] = x[slots // k]
        row_map.view(-1)[slots] = start + torch.arange(n)
        blocks.append(block)
        sizes.append(seg)
        start += seg
    x_perm = torch.cat(blocks) if blocks else x.new_zeros((0,) + tuple(x.shape[1:]))
    return x_perm, row_map, torch.tensor(sizes, dtype=torch.int32)


def permute_masked(x, idx, num_experts, max_rows, capacity=None):
    """The masked layout: [E, max_rows, ...] with expert e's first min(capacity, max_rows) slots in
    token order, then zeros. Returns (x_perm, row_map into the flat [E * max_rows] rows, kept rows)."""
    T, k = idx.shape
    idx = idx.long()
    keep = max_rows if capacity is None else min(capacity, max_rows)
    x_perm = torch.zeros((num_experts, max_rows) + tuple(x.shape[1:]), dtype=x.dtype)
    row_map = torch.full((T, k), -1, dtype=torch.long)
    kept = []
    for e in range(num_experts):
        slots = (idx.flatten() == e).nonzero().flatten()[:keep]
        x_perm[e, :len(slots)] = x[slots // k]
        row_map.view(-1)[slots] = e * max_rows + torch.arange(len(slots))
        kept.append(len(slots))
    return x_perm, row_map, torch.tensor(kept, dtype=torch.int32)


def unpermute(y, row_map, weights=None):
    """sum_j w[t, j] * y[row_map[t, j]] in float64."""
    T, k = row_map.shape
    out = torch.zeros(T, y.shape[1], dtype=torch.float64)
    for j in range(k):
        r = row_map[:, j]
        ok = r >= 0
        w = weights[:, j].double() if weights is not None else torch.ones(T, dtype=torch.float64)
        out[ok] += w[ok, None] * y.double()[r[ok]]
    return out


def grouped_gemm(a, b, sizes, trans_b=False, activation=None, bias=None, row_scale=None):
    """Per-expert float64 matmul over row segments, + bias[e] before the activation, * row_scale
    after it; rows past the last segment give zeros."""
    sizes = [int(v) for v in sizes]
    if len(sizes) == b.shape[0] + 1:
        sizes = [sizes[i + 1] - sizes[i] for i in range(b.shape[0])]
    n = b.shape[1] if trans_b else b.shape[2]
    n_out = n // 2 if activation == "swiglu" else n
    out = torch.zeros(a.shape[0], n_out, dtype=torch.float64)
    start = 0
    for e, m in enumerate(sizes):
        be = b[e].double().t() if trans_b else b[e].double()
        h = a[start:start + m].double() @ be
        if bias is not None:
            h = h + bias[e].double()
        if activation == "swiglu":
            h = torch.nn.functional.silu(h[:, :n_out]) * h[:, n_out:]
        if row_scale is not None:
            h = h * row_scale[start:start + m].double().unsqueeze(1)
        out[start:start + m] = h
        start += m
    return out


def moe_layer(x, router_w, w1, w2, k, score="softmax", renormalize=True, routed_scaling_factor=1.0,
              expert_bias=None):
    """A plain-torch MoE layer (softmax/topk, argsort, per-expert matmul, index_add); no capacity.

    x [T, H]; router_w [E, H]; w1 [E, H, 2F] (gate | up); w2 [E, F, H]. Differentiable.
    """
    T, H = x.shape
    E, F = w1.shape[0], w2.shape[1]
    logits = x @ router_w.t()
    s = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    sel = s + expert_bias if expert_bias is not None else s
    idx = stable_topk(sel.detach(), k)
    w = s.gather(1, idx)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    w = w * routed_scaling_factor
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    tok = order // k
    out = torch.zeros_like(x)
    counts = torch.bincount(flat, minlength=E).tolist()
    start = 0
    for e, n in enumerate(counts):
        rows = order[start:start + n]
        t = tok[start:start + n]
        h = x[t] @ w1[e]
        y = (torch.nn.functional.silu(h[:, :F]) * h[:, F:]) @ w2[e]
        out = out.index_add(0, t, y * w.flatten()[rows][:, None])
        start += n
    return out
