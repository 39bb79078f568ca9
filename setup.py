"""Builds the one extension moe_ext._C.

CPU-only when the installed torch has no CUDA, nvcc is missing, or MOE_EXT_SKIP_CUDA=1;
CPU + CUDA otherwise (TORCH_CUDA_ARCH_LIST defaults to 9.0a). Never queries a GPU.
"""
import glob
import os
import shutil
import subprocess
import sys

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


def nccl_paths():
    """(include dir, lib dir, rpath or None) of the NCCL the extension compiles and links against.

    One process holds one libnccl.so.2, the one torch loaded: torch's CUDA wheels depend on the
    nvidia-nccl-cuXX wheel and load site-packages/nvidia/nccl/lib/libnccl.so.2 when `import torch`
    runs (libtorch_cuda.so needs it). We link by soname (-l:libnccl.so.2; the wheel has no
    unversioned libnccl.so), so the loader satisfies our dependency with that already-loaded
    copy: the same library and version as torch's, never a second one. The headers come from
    the same place, so we compile against the version that runs. The rpath
    $ORIGIN/../nvidia/nccl/lib (from site-packages/moe_ext/_C.so) is only a fallback for loading
    _C without torch; it names the same file torch loads. NCCL_HOME overrides the wheel (a torch
    built against a system NCCL); then no rpath is added and torch's copy still wins.
    """
    home = os.environ.get("NCCL_HOME")
    if home:
        inc, lib, rpath = os.path.join(home, "include"), os.path.join(home, "lib"), None
    else:
        import importlib.util

        try:
            spec = importlib.util.find_spec("nvidia.nccl")
        except ImportError:  # no nvidia namespace package at all
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(
                "moe_ext CUDA build: NCCL not found. Install the nvidia-nccl wheel matching torch's CUDA "
                f"major (nvidia-nccl-cu{torch.version.cuda.split('.')[0]}), or set NCCL_HOME, "
                "or build CPU-only with MOE_EXT_SKIP_CUDA=1.")
        root = list(spec.submodule_search_locations)[0]
        inc, lib, rpath = os.path.join(root, "include"), os.path.join(root, "lib"), "$ORIGIN/../nvidia/nccl/lib"
    if not os.path.isfile(os.path.join(inc, "nccl.h")) or not os.path.isfile(os.path.join(lib, "libnccl.so.2")):
        raise RuntimeError(f"moe_ext CUDA build: expected {inc}/nccl.h and {lib}/libnccl.so.2")
    return inc, lib, rpath


def _links_libstdcxx_statically(cc):
    """True when compiler `cc` has only a static libstdc++ (libstdc++.a, no libstdc++.so).

    Linking the extension with such a compiler embeds a second copy of libstdc++ in _C.so next to
    the one torch loaded. The two copies disagree on locale state, so the first error message that
    formats an integer (every TORCH_CHECK naming a size) crashes the process instead of raising.
    Seen on a machine whose CC/CXX named a GCC install without a shared libstdc++."""
    def where(name):
        try:
            out = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        path = out.stdout.strip()
        return path if os.path.isabs(path) and os.path.exists(path) else None

    return where("libstdc++.so") is None and where("libstdc++.a") is not None


def use_compilers_with_shared_libstdcxx():
    """Replaces CC/CXX by the g++/gcc on PATH when CXX would embed a static libstdc++ (see above)."""
    cxx = os.environ.get("CXX", "c++")
    if not _links_libstdcxx_statically(cxx):
        return
    for gxx, gcc in (("g++", "gcc"), ("/usr/bin/g++", "/usr/bin/gcc")):
        gxx_path, gcc_path = shutil.which(gxx), shutil.which(gcc)
        if gxx_path and gcc_path and not _links_libstdcxx_statically(gxx_path) and \
                os.path.realpath(gxx_path) != os.path.realpath(shutil.which(cxx) or cxx):
            print(f"moe_ext: CXX={cxx} has no shared libstdc++; building with CXX={gxx_path} CC={gcc_path} "
                  "instead (a static libstdc++ inside _C.so crashes on the first error message)")
            os.environ["CXX"], os.environ["CC"] = gxx_path, gcc_path
            return
    raise RuntimeError(f"moe_ext build: the C++ compiler {cxx} has only a static libstdc++, which would put a "
                       "second libstdc++ inside _C.so (it crashes on the first error message). Set CXX and CC "
                       "to a compiler with a shared libstdc++ (the one torch was built with, or the system g++).")


def want_cuda():
    if os.environ.get("MOE_EXT_SKIP_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


sources = rel("csrc/cpu/*.cpp") + rel("csrc/ops/*.cpp")
include_dirs = [os.path.join(ROOT, "csrc")]
# The C++ standard is the one torch's cpp_extension picks (C++20). -ffp-contract=off: the CPU ops
# are the bit-exact reference of the CUDA kernels (which round every product and sum: __fmul_rn,
# __fadd_rn), so a*b+c must not become one fused multiply-add where the target has FMA (aarch64).
# -fno-trapping-math changes no result (nothing reads the floating-point exception flags); without
# it GCC keeps a branch-free select such as exp_rn's clamps out of vectorised loops.
cxx_flags = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
# at::parallel_for is inline: without -fopenmp here its `#pragma omp parallel` is dropped and every
# CPU op runs on one thread. The linker finds torch's own libgomp first (torch/lib is on its path).
omp_flags = ["-fopenmp"] if sys.platform.startswith("linux") else []
cxx_flags += omp_flags
use_compilers_with_shared_libstdcxx()
if want_cuda():
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    sources += rel("csrc/kernels/*.cu") + rel("csrc/comm/*.cu") + rel("csrc/ops/*.cu")
    cutlass = cutlass_include()
    if not cutlass:
        raise RuntimeError("moe_ext CUDA build: CUTLASS/CuTe headers not found (the Hopper grouped GEMM needs them). "
                           "pip install nvidia-cutlass, or put them in third_party/cutlass/include, or build "
                           "CPU-only with MOE_EXT_SKIP_CUDA=1.")
    include_dirs += cutlass
    nccl_inc, nccl_lib, nccl_rpath = nccl_paths()
    include_dirs.append(nccl_inc)
    link_args = [f"-L{nccl_lib}", "-l:libnccl.so.2"] + ([f"-Wl,-rpath,{nccl_rpath}"] if nccl_rpath else []) + omp_flags
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-DMOE_EXT_WITH_CUDA"]
    ext = CUDAExtension(
        "moe_ext._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DMOE_EXT_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=link_args,
    )
else:
    ext = CppExtension("moe_ext._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
                       extra_link_args=omp_flags)

setup(
    packages=find_packages(include=["moe_ext", "moe_ext.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
