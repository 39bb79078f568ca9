"""Builds the one extension moe_ext._C.

CPU-only when the installed torch has no CUDA, nvcc is missing, or MOE_EXT_SKIP_CUDA=1;
CPU + CUDA otherwise (TORCH_CUDA_ARCH_LIST defaults to 9.0a). Never queries a GPU.
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def cutlass_include():
    """CuTe/CUTLASS headers: third_party/cutlass if present, else the nvidia-cutlass wheel."""
    local = os.path.join(ROOT, "third_party", "cutlass", "include")
    if os.path.isdir(local):
        return [local]
    try:
        import cutlass_library

        path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
        return [path] if os.path.isdir(path) else []
    except ImportError:
        return []


def want_cuda():
    if os.environ.get("MOE_EXT_SKIP_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


sources = rel("csrc/cpu/*.cpp") + rel("csrc/ops/*.cpp")
include_dirs = [os.path.join(ROOT, "csrc")]
cxx_flags = ["-O3", "-std=c++17"]
if want_cuda():
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    sources += rel("csrc/kernels/*.cu") + rel("csrc/ops/*.cu")
    include_dirs += cutlass_include()
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-DMOE_EXT_WITH_CUDA"]
    ext = CUDAExtension(
        "moe_ext._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DMOE_EXT_WITH_CUDA"], "nvcc": nvcc_flags},
    )
else:
    ext = CppExtension("moe_ext._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags})

setup(
    packages=find_packages(include=["moe_ext", "moe_ext.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
