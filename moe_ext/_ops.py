"""Loads the compiled operator library and registers what lives in Python: the fake (Meta)
implementation of every op (symbolic and data-dependent sizes) and the autograd formulas."""
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


@torch.library.register_fake("moe_ext::permute")
def _permute_fake(x, idx, num_experts, pad_to, capacity, exact):
    torch._check(x.dim() == 2, lambda: "moe_ext.permute: x must be 2-D [num_tokens, hidden]")
    torch._check(idx.dim() == 2 and idx.shape[0] == x.shape[0], lambda: "moe_ext.permute: idx must be [num_tokens, k]")
    _same_device("moe_ext.permute: idx", idx, "x", x)
    num_tokens, k = idx.shape
    if exact:
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


@torch.library.register_fake("moe_ext::grouped_gemm")
def _grouped_gemm_fake(a, b, sizes, trans_b, activation):
    torch._check(a.dim() == 2 and b.dim() == 3, lambda: "moe_ext.grouped_gemm: a must be [M, K], b [E, K, N]")
    torch._check(a.dtype == b.dtype, lambda: "moe_ext.grouped_gemm: b must have the dtype of a")
    torch._check((b.shape[2] if trans_b else b.shape[1]) == a.shape[1],
                 lambda: "moe_ext.grouped_gemm: the K of b must equal the K of a")
    _same_device("moe_ext.grouped_gemm: b", b, "a", a)
    _same_device("moe_ext.grouped_gemm: tokens_per_expert", sizes, "a", a)
    n = b.shape[1] if trans_b else b.shape[2]
    if activation == "swiglu":
        n = n // 2
    return a.new_empty((a.shape[0], n))


@torch.library.register_fake("moe_ext::grouped_gemm_wgrad")
def _grouped_gemm_wgrad_fake(a, grad_out, sizes, num_experts, trans_b):
    torch._check(a.shape[0] == grad_out.shape[0], lambda: "moe_ext.grouped_gemm_wgrad: a and grad_out rows differ")
    if trans_b:
        return a.new_empty((num_experts, grad_out.shape[1], a.shape[1]))
    return a.new_empty((num_experts, a.shape[1], grad_out.shape[1]))


# ---- autograd ---------------------------------------------------------------------------------

def _gating_setup(ctx, inputs, output):
    logits, k, score, renormalize, expert_bias, num_groups, topk_groups, _cf, noise, seq_len = inputs
    ctx.args = (score, renormalize, num_groups, topk_groups, seq_len)
    ctx.save_for_backward(logits, noise, expert_bias, output[1])


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
    return grad_x, None, None, None, None, None


torch.library.register_autograd("moe_ext::permute", _permute_backward, setup_context=_permute_setup)


def _unpermute_setup(ctx, inputs, output):
    y, row_map, weights = inputs
    ctx.has_weights = weights is not None
    ctx.save_for_backward(y, row_map, weights)


def _unpermute_backward(ctx, g_out):
    y, row_map, weights = ctx.saved_tensors
    grad_y, grad_w = ops.unpermute_backward(g_out, y, row_map, weights)
    return grad_y, None, (grad_w if ctx.has_weights else None)


torch.library.register_autograd("moe_ext::unpermute", _unpermute_backward, setup_context=_unpermute_setup)


def swiglu_backward(grad, h):
    """d/dh of silu(h[:, :n]) * h[:, n:], in float32 (float64 for float64)."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    n = h.shape[1] // 2
    gate, up, g = h[:, :n].to(acc), h[:, n:].to(acc), grad.to(acc)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    d_gate = g * up * (sig * (1 + gate * (1 - sig)))
    return torch.cat([d_gate, g * silu], dim=1).to(h.dtype)


def _gemm_setup(ctx, inputs, output):
    a, b, sizes, trans_b, activation = inputs
    ctx.args = (trans_b, activation)
    ctx.save_for_backward(a, b, sizes)


def _gemm_backward(ctx, g):
    a, b, sizes = ctx.saved_tensors
    trans_b, activation = ctx.args
    if activation == "swiglu":
        g = swiglu_backward(g, ops.grouped_gemm(a, b, sizes, trans_b, "none"))
    grad_a = ops.grouped_gemm(g.contiguous(), b, sizes, not trans_b, "none") if ctx.needs_input_grad[0] else None
    grad_b = ops.grouped_gemm_wgrad(a, g.contiguous(), sizes, b.shape[0], trans_b) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None, None, None


torch.library.register_autograd("moe_ext::grouped_gemm", _gemm_backward, setup_context=_gemm_setup)
