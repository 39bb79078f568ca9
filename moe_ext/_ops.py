"""Loads the compiled operator library and registers what lives in Python: the fake (Meta)
implementation of every op (symbolic and data-dependent sizes) and the autograd formulas."""
import functools

import torch

from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)

ops = torch.ops.moe_ext


def permute_max_rows(num_tokens, k, num_experts, pad_to, capacity):
    """Worst-case rows of permute's output (the same rule as csrc/ops/checks.h)."""
    n = num_tokens * k
    if capacity >= 0:
        n = torch.sym_min(n, capacity * num_experts)
    return n + torch.sym_min(n, num_experts) * (pad_to - 1)


# ---- fake (Meta) implementations: shapes, dtypes and the checks that need no values ------------

def _same_device(name, t, ref_name, ref):
    if t is not None:
        torch._check(t.device == ref.device, lambda: f"{name} must be on the same device as {ref_name}")


def _gating_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.register_fake("moe_ext::topk_gating")
def _topk_gating_fake(logits, k, score, renormalize, expert_bias, num_groups, topk_groups, capacity_factor, noise,
                      seq_len):
    torch._check(logits.dim() == 2, lambda: "moe_ext.topk_gating: logits must be 2-D [num_tokens, num_experts]")
    torch._check(1 <= k <= logits.shape[1], lambda: "moe_ext.topk_gating: k must be in [1, num_experts]")
    torch._check(score in ("softmax", "sigmoid"), lambda: "moe_ext.topk_gating: score must be 'softmax' or 'sigmoid'")
    _same_device("moe_ext.topk_gating: expert_bias", expert_bias, "logits", logits)
    _same_device("moe_ext.topk_gating: noise", noise, "logits", logits)
    T, E = logits.shape
    wd = _gating_dtype(logits)
    return (logits.new_empty((T, k), dtype=wd), logits.new_empty((T, k), dtype=torch.int32),
            logits.new_empty((T, k), dtype=torch.int32), logits.new_empty((E,), dtype=torch.int32),
            logits.new_empty((), dtype=wd), logits.new_empty((), dtype=wd), logits.new_empty((), dtype=wd))


@torch.library.register_fake("moe_ext::topk_gating_backward")
def _topk_gating_backward_fake(grad_weights, grad_aux, grad_seq_aux, grad_z, logits, noise, idx, score, renormalize,
                               expert_bias, num_groups, topk_groups, seq_len):
    torch._check(grad_weights.shape == idx.shape, lambda: "moe_ext.topk_gating_backward: grad_weights must match idx")
    return torch.empty_like(logits)


@torch.library.register_fake("moe_ext::update_expert_bias_")
def _update_expert_bias_fake(expert_bias, tokens_per_expert, rate):
    torch._check(expert_bias.dim() == 1 and tokens_per_expert.shape == expert_bias.shape,
                 lambda: "moe_ext.update_expert_bias: expert_bias and tokens_per_expert must both be [E]")
    _same_device("tokens_per_expert", tokens_per_expert, "expert_bias", expert_bias)


@torch.library.register_fake("moe_ext::route_to_replicas")
def _route_to_replicas_fake(idx, replica_counts, replica_slots, rank):
    torch._check(replica_counts.dim() == 1 and replica_slots.dim() == 2
                 and replica_slots.shape[0] == replica_counts.shape[0],
                 lambda: "moe_ext.route_to_replicas: replica_counts [E] and replica_slots [E, C] expected")
    _same_device("moe_ext.route_to_replicas: replica_counts", replica_counts, "idx", idx)
    _same_device("moe_ext.route_to_replicas: replica_slots", replica_slots, "idx", idx)
    return torch.empty_like(idx, memory_format=torch.contiguous_format)


@torch.library.register_fake("moe_ext::accumulate_load_")
def _accumulate_load_fake(load, load_ema, tokens_per_expert, decay):
    torch._check(load.dim() == 1 and tuple(load_ema.shape) == (load.shape[0] + 1,)
                 and tuple(tokens_per_expert.shape) == tuple(load.shape),
                 lambda: "moe_ext.accumulate_load_: load [E], load_ema [E + 1] and tokens_per_expert [E] expected")
    _same_device("moe_ext.accumulate_load_: load_ema", load_ema, "load", load)
    _same_device("moe_ext.accumulate_load_: tokens_per_expert", tokens_per_expert, "load", load)


@torch.library.register_fake("moe_ext::permute")
def _permute_fake(x, idx, num_experts, pad_to, capacity, exact, max_rows=-1):
    torch._check(x.dim() == 2, lambda: "moe_ext.permute: x must be 2-D [num_tokens, hidden]")
    torch._check(idx.dim() == 2 and idx.shape[0] == x.shape[0], lambda: "moe_ext.permute: idx must be [num_tokens, k]")
    _same_device("moe_ext.permute: idx", idx, "x", x)
    torch._check(max_rows == -1 or (max_rows >= 1 and pad_to == 1),
                 lambda: "moe_ext.permute: max_rows must be None or >= 1, with pad_to 1")
    num_tokens, k = idx.shape
    torch._check(num_tokens * k <= 2**31 - 1 - (pad_to - 1), lambda: (
        f"moe_ext.permute: num_tokens * k + pad_to - 1 must be < 2^31 (tokens_per_expert is int32), got "
        f"num_tokens * k = {num_tokens * k} and pad_to = {pad_to}"))
    if max_rows >= 1:
        rows = num_experts * max_rows
    elif exact:
        rows = torch.library.get_ctx().new_dynamic_size()
    else:
        rows = permute_max_rows(num_tokens, k, num_experts, pad_to, capacity)
    return (
        x.new_empty((rows, x.shape[1])),
        idx.new_empty((num_tokens, k), dtype=torch.int64),
        idx.new_empty((num_experts,), dtype=torch.int32),
    )


@torch.library.register_fake("moe_ext::unpermute")
def _unpermute_fake(y, row_map, weights):
    torch._check(y.dim() == 2 and row_map.dim() == 2, lambda: "moe_ext.unpermute: y_perm and row_map must be 2-D")
    torch._check(row_map.dtype == torch.int64, lambda: "moe_ext.unpermute: row_map must be int64")
    _same_device("moe_ext.unpermute: row_map", row_map, "y_perm", y)
    _same_device("moe_ext.unpermute: weights", weights, "y_perm", y)
    return y.new_empty((row_map.shape[0], y.shape[1]))


@torch.library.register_fake("moe_ext::unpermute_backward")
def _unpermute_backward_fake(grad_out, y, row_map, weights):
    # NOTE: new_empty, not empty_like: the real ops (CPU and CUDA) return contiguous grad_y and
    # grad_weights, while empty_like keeps the strides of a dense non-contiguous input (e.g.
    # transposed weights), a stride mismatch between fake and real outputs.
    grad_w = weights.new_empty(weights.shape) if weights is not None else y.new_empty((0,))
    return y.new_empty(y.shape), grad_w


def check_gemm_epilogue_fake(op, a, b, trans_b, bias, row_scale, rows):
    """The fake side of checks.h's check_gemm_epilogue: bias [E, N] in a's dtype, row_scale `rows`."""
    n = b.shape[1] if trans_b else b.shape[2]
    if bias is not None:
        torch._check(tuple(bias.shape) == (b.shape[0], n), lambda: f"{op}: bias must be [E, N] (N before the activation)")
        torch._check(bias.dtype == a.dtype, lambda: f"{op}: bias must have the dtype of a")
        _same_device(f"{op}: bias", bias, "a", a)
    if row_scale is not None:
        torch._check(tuple(row_scale.shape) == tuple(rows), lambda: f"{op}: row_scale must have one value per output row")
        torch._check(row_scale.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                     lambda: f"{op}: row_scale must be a float tensor")
        _same_device(f"{op}: row_scale", row_scale, "a", a)


@torch.library.register_fake("moe_ext::grouped_gemm")
def _grouped_gemm_fake(a, b, sizes, trans_b, activation, bias=None, row_scale=None):
    torch._check(a.dim() == 2 and b.dim() == 3, lambda: "moe_ext.grouped_gemm: a must be [M, K], b [E, K, N]")
    torch._check(a.dtype == b.dtype, lambda: "moe_ext.grouped_gemm: b must have the dtype of a")
    torch._check((b.shape[2] if trans_b else b.shape[1]) == a.shape[1],
                 lambda: "moe_ext.grouped_gemm: the K of b must equal the K of a")
    _same_device("moe_ext.grouped_gemm: b", b, "a", a)
    _same_device("moe_ext.grouped_gemm: tokens_per_expert", sizes, "a", a)
    check_gemm_epilogue_fake("moe_ext.grouped_gemm", a, b, trans_b, bias, row_scale, (a.shape[0],))
    n = b.shape[1] if trans_b else b.shape[2]
    if activation == "swiglu":
        n = n // 2
    return a.new_empty((a.shape[0], n))


@torch.library.register_fake("moe_ext::swiglu")
def _swiglu_fake(h):
    torch._check(h.dim() == 2 and h.shape[1] % 2 == 0, lambda: "moe_ext.swiglu: h must be 2-D [rows, 2n]")
    return h.new_empty((h.shape[0], h.shape[1] // 2))


@torch.library.register_fake("moe_ext::swiglu_backward")
def _swiglu_backward_fake(grad, h):
    torch._check(h.dim() == 2 and grad.dim() == 2, lambda: "moe_ext.swiglu_backward: grad and h must be 2-D")
    return torch.empty_like(h, memory_format=torch.contiguous_format)


@torch.library.register_fake("moe_ext::grouped_gemm_wgrad")
def _grouped_gemm_wgrad_fake(a, grad_out, sizes, num_experts, trans_b):
    torch._check(a.shape[0] == grad_out.shape[0], lambda: "moe_ext.grouped_gemm_wgrad: a and grad_out rows differ")
    if trans_b:
        return a.new_empty((num_experts, grad_out.shape[1], a.shape[1]))
    return a.new_empty((num_experts, a.shape[1], grad_out.shape[1]))


# ---- autograd ---------------------------------------------------------------------------------

def first_order_only(name):
    """Decorates a registered backward whose ops have no autograd of their own: under
    create_graph=True its gradients are still right, and a second backward through them raises
    (instead of silently giving zeros, or an unrelated error from an out= kernel)."""
    def wrap(fn):
        @functools.wraps(fn)
        def backward(ctx, *grads):
            with torch.no_grad():
                out = fn(ctx, *grads)
            if not torch.is_grad_enabled():
                return out
            # The gradients depend on the incoming grads and on the saved inputs: an empty slice of
            # each that requires grad (a sum of exactly 0) ties them to the error node, so that a
            # second backward towards any of them reaches it (else it would see no path: zeros).
            anchors = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not anchors:
                return out
            link = sum(t.flatten()[:0].sum() for t in anchors)
            single = not isinstance(out, tuple)
            outs = (out,) if single else out
            err = torch._C._functions.DelayedError(
                f"{name}: double backward (a gradient of this gradient) is not supported".encode(), len(outs))
            outs = err(*[None if t is None else t + link.to(t.dtype) for t in outs])
            return outs if single else tuple(outs)  # (one output comes back bare, not in a tuple)
        return backward
    return wrap


def _gating_setup(ctx, inputs, output):
    logits, k, score, renormalize, expert_bias, num_groups, topk_groups, _cf, noise, seq_len = inputs
    ctx.args = (score, renormalize, num_groups, topk_groups, seq_len)
    ctx.save_for_backward(logits, noise, expert_bias, output[1])


@first_order_only("moe_ext.topk_gating")
def _gating_backward(ctx, g_w, _g_idx, _g_pos, _g_tpe, g_aux, g_seq, g_z):
    logits, noise, expert_bias, idx = ctx.saved_tensors
    score, renormalize, num_groups, topk_groups, seq_len = ctx.args
    wdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    zero = logits.new_zeros((), dtype=wdtype)
    g_w = g_w if g_w is not None else logits.new_zeros(idx.shape, dtype=wdtype)
    grad = ops.topk_gating_backward(
        g_w, zero if g_aux is None else g_aux, zero if g_seq is None else g_seq, zero if g_z is None else g_z,
        logits, noise, idx, score, renormalize, expert_bias, num_groups, topk_groups, seq_len)
    return grad, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("moe_ext::topk_gating", _gating_backward, setup_context=_gating_setup)


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _permute_backward(ctx, g_xperm, _g_row_map, _g_tpe):
    (row_map,) = ctx.saved_tensors
    grad_x = None if g_xperm is None else ops.unpermute(g_xperm.contiguous(), row_map, None)
    return grad_x, None, None, None, None, None, None


torch.library.register_autograd("moe_ext::permute", _permute_backward, setup_context=_permute_setup)


def _unpermute_setup(ctx, inputs, output):
    y, row_map, weights = inputs
    ctx.has_weights = weights is not None
    ctx.save_for_backward(y, row_map, weights)


@first_order_only("moe_ext.unpermute")
def _unpermute_backward(ctx, g_out):
    y, row_map, weights = ctx.saved_tensors
    grad_y, grad_w = ops.unpermute_backward(g_out, y, row_map, weights)
    return grad_y, None, (grad_w if ctx.has_weights else None)


torch.library.register_autograd("moe_ext::unpermute", _unpermute_backward, setup_context=_unpermute_setup)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


@first_order_only("moe_ext.swiglu")
def _swiglu_grad(ctx, g):
    return ops.swiglu_backward(g, ctx.saved_tensors[0])


torch.library.register_autograd("moe_ext::swiglu", _swiglu_grad, setup_context=_swiglu_setup)


def swiglu_backward(grad, h):
    """d/dh of silu(h[:, :n]) * h[:, n:] for grad [rows, n] and h [rows, 2n], in float32 (float64
    for float64), h's dtype out: one pass over memory on CUDA (csrc/kernels/swiglu.cu)."""
    return ops.swiglu_backward(grad, h)


def gemm_epilogue_backward(g, forward, activation, row_scale, scale_grad, a_dtype):
    """Undoes the epilogue y = row_scale * act(h + bias) for a grouped GEMM's backward.

    g: the gradient of y (rows in the leading dimensions, columns last). forward(activation,
    row_scale) reruns the GEMM on the same inputs and bias. Returns dL/dh in a's dtype, contiguous,
    and dL/drow_scale (None unless scale_grad)."""
    acc = _acc_dtype(a_dtype)
    h = forward("none", None) if activation == "swiglu" or scale_grad else None
    grad_scale = None
    if row_scale is not None:
        if scale_grad:
            if activation == "swiglu":  # NOTE: from the rounded h, as swiglu_backward below
                n = h.shape[-1] // 2
                y = torch.nn.functional.silu(h.narrow(-1, 0, n).to(acc)) * h.narrow(-1, n, n).to(acc)
            else:
                y = h.to(acc)
            grad_scale = (g.to(acc) * y).sum(-1).to(row_scale.dtype)
        g = g.to(acc) * row_scale.to(acc).unsqueeze(-1)
    if activation == "swiglu":
        shape = g.shape
        g = swiglu_backward(g.flatten(0, -2), h.flatten(0, -2)).view(*shape[:-1], h.shape[-1])  # any size, 0 too
    return g.to(a_dtype).contiguous(), grad_scale


def _gemm_setup(ctx, inputs, output):
    a, b, sizes, trans_b, activation, bias, row_scale = inputs
    ctx.trans_b, ctx.activation = trans_b, activation
    ctx.save_for_backward(a, b, sizes, bias, row_scale)


@first_order_only("moe_ext.grouped_gemm")
def _gemm_backward(ctx, g):
    a, b, sizes, bias, row_scale = ctx.saved_tensors
    trans_b, E = ctx.trans_b, b.shape[0]
    g, grad_scale = gemm_epilogue_backward(
        g, lambda act, scale: ops.grouped_gemm(a, b, sizes, trans_b, act, bias, scale), ctx.activation, row_scale,
        row_scale is not None and ctx.needs_input_grad[6], a.dtype)
    grad_a = ops.grouped_gemm(g, b, sizes, not trans_b, "none") if ctx.needs_input_grad[0] else None
    grad_b = ops.grouped_gemm_wgrad(a, g, sizes, E, trans_b) if ctx.needs_input_grad[1] else None
    grad_bias = None
    if bias is not None and ctx.needs_input_grad[5]:
        # NOTE: each expert's column sums of g, as a k-grouped GEMM with columns of ones: no host
        # sync for the row offsets, and the same summation order every run (index_add would use
        # atomics on CUDA). 8 columns: the kernel's 16-byte rows.
        grad_bias = ops.grouped_gemm_wgrad(g.new_ones((g.shape[0], 8)), g, sizes, E, False)[:, 0].contiguous()
    return grad_a, grad_b, None, None, None, grad_bias, grad_scale


torch.library.register_autograd("moe_ext::grouped_gemm", _gemm_backward, setup_context=_gemm_setup)
