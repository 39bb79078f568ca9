"""grouped_gemm_masked (the masked decode layout): its fake (Meta) implementation and autograd.

The op itself is registered in C++ (csrc/ops/grouped_gemm_masked.cpp, CPU; grouped_gemm_cuda.cu,
CUDA). Imported by moe_ext.gemm, which holds the public wrapper.
"""
import torch

from ._ops import _acc_dtype, _gemm_setup, check_gemm_epilogue_fake, first_order_only, gemm_epilogue_backward, ops


@torch.library.register_fake("moe_ext::grouped_gemm_masked")
def _grouped_gemm_masked_fake(a, b, valid_rows, trans_b, activation, bias=None, row_scale=None):
    op = "moe_ext.grouped_gemm_masked"
    torch._check(a.dim() == 3 and b.dim() == 3, lambda: f"{op}: a must be [E, max_rows, K], b [E, K, N]")
    torch._check(a.dtype == b.dtype, lambda: f"{op}: b must have the dtype of a")
    torch._check(a.shape[0] == b.shape[0], lambda: f"{op}: a and b must hold the same number of experts")
    torch._check((b.shape[2] if trans_b else b.shape[1]) == a.shape[2],
                 lambda: f"{op}: the K of b must equal the K of a")
    torch._check(valid_rows.dim() == 1 and valid_rows.shape[0] == b.shape[0],
                 lambda: f"{op}: valid_rows must be [E]")
    torch._check(a.device == b.device and a.device == valid_rows.device,
                 lambda: f"{op}: a, b and valid_rows must be on one device")
    check_gemm_epilogue_fake(op, a, b, trans_b, bias, row_scale, a.shape[:2])
    n = b.shape[1] if trans_b else b.shape[2]
    if activation == "swiglu":
        n = n // 2
    return a.new_empty((a.shape[0], a.shape[1], n))


def _row_mask(valid_rows, max_rows):
    """[E, max_rows, 1] bool: rows below each expert's valid count (on the device, no sync)."""
    rows = torch.arange(max_rows, device=valid_rows.device)
    return (rows[None, :] < valid_rows[:, None].to(rows.dtype)).unsqueeze(-1)


@first_order_only("moe_ext.grouped_gemm_masked")
def _masked_backward(ctx, g):
    a, b, valid_rows, bias, row_scale = ctx.saved_tensors
    trans_b = ctx.trans_b
    E, R, K = a.shape
    mask = _row_mask(valid_rows, R)
    # NOTE: rows past valid_rows are outputs fixed at zero: their gradient is dropped, and a's rows
    # there (often uninitialised in worst-case buffers) must not reach grad_b, not even as 0 * NaN.
    g = torch.where(mask, g, torch.zeros((), dtype=g.dtype, device=g.device))
    if row_scale is not None:  # NOTE: likewise its rows there (a NaN would survive 0 * NaN into grad_b)
        row_scale = torch.where(mask.squeeze(-1), row_scale, torch.zeros((), dtype=row_scale.dtype,
                                                                          device=row_scale.device))
    g, grad_scale = gemm_epilogue_backward(
        g, lambda act, scale: ops.grouped_gemm_masked(a, b, valid_rows, trans_b, act, bias, scale), ctx.activation,
        row_scale, row_scale is not None and ctx.needs_input_grad[6], a.dtype)
    grad_a = grad_b = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_a = ops.grouped_gemm_masked(g, b, valid_rows, not trans_b, "none")
    if ctx.needs_input_grad[1]:
        a_valid = torch.where(mask, a, torch.zeros((), dtype=a.dtype, device=a.device)).reshape(E * R, K)
        rows = torch.full((E,), R, dtype=torch.int64, device=a.device)
        grad_b = ops.grouped_gemm_wgrad(a_valid, g.reshape(E * R, g.shape[-1]), rows, E, trans_b)
    if bias is not None and ctx.needs_input_grad[5]:
        grad_bias = g.to(_acc_dtype(a.dtype)).sum(1).to(bias.dtype)  # rows past valid_rows are zero in g
    return grad_a, grad_b, None, None, None, grad_bias, grad_scale


torch.library.register_autograd("moe_ext::grouped_gemm_masked", _masked_backward, setup_context=_gemm_setup)  # same inputs as grouped_gemm's
