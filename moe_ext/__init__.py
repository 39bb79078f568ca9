"""moe_ext: expert-parallel Mixture-of-Experts kernels for PyTorch."""
from . import _ops  # noqa: F401  (loads torch.ops.moe_ext and registers fakes/autograd)
from .dispatch import DispatchHandle, combine, communicator, describe, dispatch, masked_rows
from .gemm import grouped_gemm, grouped_gemm_masked
from .layer import MoE
from .permute import permute, unpermute
from .routing import GatingStats, topk_gating, update_expert_bias

__version__ = "0.1.0"

_SUBMODULES = ("bench", "cli", "demo", "hf", "placement", "plan")


def __getattr__(name):
    # NOTE: the submodules beyond the ops load on first use (moe_ext.hf.patch_model, moe_ext.placement
    # .rebalance, ... as README.md writes them), not at `import moe_ext`.
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'moe_ext' has no attribute {name!r}")

__all__ = [
    "DispatchHandle", "GatingStats", "MoE", "combine", "communicator", "describe", "dispatch", "grouped_gemm",
    "grouped_gemm_masked", "masked_rows", "permute", "topk_gating", "unpermute", "update_expert_bias",
]
