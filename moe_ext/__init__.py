"""moe_ext: expert-parallel Mixture-of-Experts kernels for PyTorch."""
from . import _ops  # noqa: F401  (loads torch.ops.moe_ext and registers fakes/autograd)
from .dispatch import DispatchHandle, combine, communicator, describe, dispatch, masked_rows
from .gemm import grouped_gemm
from .layer import MoE
from .permute import permute, unpermute
from .routing import GatingStats, topk_gating, update_expert_bias

__version__ = "0.1.0"

__all__ = [
    "DispatchHandle", "GatingStats", "MoE", "combine", "communicator", "describe", "dispatch", "grouped_gemm",
    "masked_rows", "permute", "topk_gating", "unpermute", "update_expert_bias",
]
