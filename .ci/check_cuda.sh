#!/usr/bin/env bash
# Compile check of every CUDA source (.cu) in the repository, for machines without a GPU.
#
#   .ci/check_cuda.sh                  # every .cu that git knows or would add
#   .ci/check_cuda.sh csrc/ops/x.cu    # only these files
#
# Nothing is run and nothing is kept: each file is compiled with `nvcc -c` for sm_90a, two at a
# time, and any failure fails the script with that file's compiler output. Three flavours:
#   csrc/ops/*.cu      op adapters: against the GPU machine's torch (2.11, CUDA build) headers,
#                      because the CPU torch installed here lacks the generated c10/cuda headers;
#                      the wheel is downloaded once and only torch/include/ is kept, under
#                      ~/.cache/moe_ext/ (MOE_EXT_CACHE) keyed by version.
#   csrc/kernels/*.cu  torch-free kernels, with the defines torch's CUDAExtension adds when setup.py
#                      compiles them into the extension (-D__CUDA_NO_HALF_OPERATORS__ and friends,
#                      which forbid implicit half/bf16 conversions); the CMake build compiles them
#                      again without, so both builds are covered.
#   everything else    (bench/, csrc/comm/, ...) plain nvcc, as CMake builds them.
# It also syntax-checks every csrc/**/*.cpp with the host compiler as the CUDA build of the
# extension compiles it (-DMOE_EXT_WITH_CUDA, torch 2.11 headers): the CPU build in CI never sees
# those #ifdef branches nor the GPU machine's torch (MOE_EXT_CHECK_CPP=0 skips this).
#
# Environment: NVCC (default $CUDA_HOME/bin/nvcc or nvcc), PYTHON (finds the nvidia-nccl and
# nvidia-cutlass wheels; default python3), NCCL_HOME, MOE_EXT_CHECK_JOBS (2),
# MOE_EXT_CHECK_GENCODE (arch=compute_90a,code=sm_90a), MOE_EXT_TORCH_HEADERS (2.11.0).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [[ -z "${NVCC:-}" ]]; then
  if [[ -x "$CUDA_HOME/bin/nvcc" ]]; then NVCC="$CUDA_HOME/bin/nvcc"; else NVCC=nvcc; fi
fi
PYTHON=${PYTHON:-python3}
JOBS=${MOE_EXT_CHECK_JOBS:-2}
GENCODE=${MOE_EXT_CHECK_GENCODE:-arch=compute_90a,code=sm_90a}
TORCH_VERSION=${MOE_EXT_TORCH_HEADERS:-2.11.0}
# The GPU machine runs Python 3.12; the headers are the same for any Python, the wheel tag is not.
TORCH_PYVER=3.12
TORCH_PLATFORM=manylinux_2_28_x86_64
CACHE=${MOE_EXT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moe_ext}

# --- The files: given on the command line, else every tracked or untracked-but-not-ignored .cu.
if (($#)); then
  files=("$@")
elif git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  mapfile -t files < <(git ls-files --cached --others --exclude-standard -- '*.cu' | grep -v '^third_party/' | sort -u)
  [[ "${MOE_EXT_CHECK_CPP:-1}" == 0 ]] || mapfile -t -O "${#files[@]}" files < <(
    git ls-files --cached --others --exclude-standard -- 'csrc/*.cpp' | sort -u)
else
  mapfile -t files < <(find csrc bench -name '*.cu' 2>/dev/null | sort)
  [[ "${MOE_EXT_CHECK_CPP:-1}" == 0 ]] || mapfile -t -O "${#files[@]}" files < <(find csrc -name '*.cpp' | sort)
fi
# A file deleted in the working tree but still in the index is not ours to compile.
existing=()
for f in "${files[@]}"; do [[ -f "$f" ]] && existing+=("$f"); done
files=("${existing[@]}")
if ((${#files[@]} == 0)); then
  echo "check_cuda: no .cu files found, nothing to check"
  exit 0
fi

locate() {  # prints a directory from Python, or nothing
  "$PYTHON" -c "$1" 2>/dev/null || true
}

# --- Include paths shared by every flavour.
common=(-c -std=c++17 "-gencode=$GENCODE" --expt-relaxed-constexpr -I"$ROOT/csrc")
if [[ -d third_party/cutlass/include/cute ]]; then
  cutlass_inc="$ROOT/third_party/cutlass/include"
else
  cutlass_inc=$(locate "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))")
fi
if [[ -n "$cutlass_inc" && -d "$cutlass_inc" ]]; then
  common+=(-isystem "$cutlass_inc")
else
  echo "check_cuda: WARNING: no CUTLASS/CuTe headers (pip install nvidia-cutlass); files that include them will fail"
fi
if [[ -n "${NCCL_HOME:-}" ]]; then
  nccl_inc="$NCCL_HOME/include"
else
  nccl_inc=$(locate "import importlib.util as u; print(list(u.find_spec('nvidia.nccl').submodule_search_locations)[0] + '/include')")
fi
if [[ -n "$nccl_inc" && -f "$nccl_inc/nccl.h" ]]; then
  common+=(-isystem "$nccl_inc")
else
  echo "check_cuda: WARNING: no NCCL headers (pip install nvidia-nccl-cu13, or NCCL_HOME); files that include nccl.h will fail"
fi

# What torch's CUDAExtension adds to every nvcc command (torch/utils/cpp_extension.py).
torch_nvcc_defines=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
                    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
                    -Xcompiler -fPIC -DMOE_EXT_WITH_CUDA)
kernel_flags=("${common[@]}" "${torch_nvcc_defines[@]}")
plain_flags=("${common[@]}")

# --- torch's CUDA headers, only when there is an op adapter to check.
need_torch=0
for f in "${files[@]}"; do [[ "$f" == csrc/ops/* || "$f" == *.cpp ]] && need_torch=1; done
if ((need_torch)); then
  headers="$CACHE/torch-$TORCH_VERSION-cp${TORCH_PYVER/./}-$TORCH_PLATFORM"
  mkdir -p "$CACHE"
  (
    flock 9  # two checks at once would both download
    if [[ ! -f "$headers/.complete" ]]; then
      echo "check_cuda: fetching torch==$TORCH_VERSION headers (one-time ~530 MB download) into $headers"
      tmp=$(mktemp -d "$CACHE/download.XXXXXX")
      trap 'rm -rf "$tmp"' EXIT
      "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$TORCH_PYVER" \
        --platform "$TORCH_PLATFORM" -d "$tmp" "torch==$TORCH_VERSION"
      rm -rf "$headers"
      mkdir -p "$tmp/x"
      if command -v unzip >/dev/null; then
        unzip -q "$tmp"/torch-*.whl 'torch/include/*' -d "$tmp/x"
      else
        "$PYTHON" -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("torch/include/")])' "$tmp"/torch-*.whl "$tmp/x"
      fi
      mv "$tmp/x" "$headers"
      touch "$headers/.complete"
    fi
  ) 9>"$CACHE/.lock"
  python_inc=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  op_flags=("${kernel_flags[@]}" -isystem "$headers/torch/include"
            -isystem "$headers/torch/include/torch/csrc/api/include" -isystem "$python_inc"
            -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1)
  # The host compiler nvcc uses, with the flags setup.py gives .cpp files in a CUDA build.
  cpp_cmd=("${CXX:-c++}" -c -std=c++17 -O0 -fPIC -DMOE_EXT_WITH_CUDA -I"$ROOT/csrc"
           -isystem "$headers/torch/include" -isystem "$headers/torch/include/torch/csrc/api/include"
           -isystem "$python_inc" -isystem "$CUDA_HOME/include" -DTORCH_API_INCLUDE_EXTENSION_H
           -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1)
  [[ -n "$cutlass_inc" && -d "$cutlass_inc" ]] && cpp_cmd+=(-isystem "$cutlass_inc")
  [[ -n "$nccl_inc" && -f "$nccl_inc/nccl.h" ]] && cpp_cmd+=(-isystem "$nccl_inc")
fi

echo "check_cuda: $("$NVCC" --version | tail -n 1)"
echo "check_cuda: ${#files[@]} file(s), $JOBS at a time, -gencode=$GENCODE (.cpp: host syntax check as in the CUDA build)"

work=$(mktemp -d "${TMPDIR:-/tmp}/moe_ext_check_cuda.XXXXXX")
trap 'rm -rf "$work"' EXIT

compile_one() {  # index file: writes $work/$i.{log,rc,sec,cmd}
  local i=$1 f=$2 cmd start rc
  case "$f" in
    *.cpp) cmd=("${cpp_cmd[@]}" "$f" -o "$work/$i.o") ;;
    csrc/ops/*) cmd=("$NVCC" "${op_flags[@]}" "$f" -o "$work/$i.o") ;;
    csrc/kernels/*) cmd=("$NVCC" "${kernel_flags[@]}" "$f" -o "$work/$i.o") ;;
    *) cmd=("$NVCC" "${plain_flags[@]}" "$f" -o "$work/$i.o") ;;
  esac
  printf '%q ' "${cmd[@]}" >"$work/$i.cmd"
  start=$EPOCHREALTIME
  rc=0
  "${cmd[@]}" >"$work/$i.log" 2>&1 || rc=$?
  echo "$rc" >"$work/$i.rc"
  awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }' >"$work/$i.sec"
  # The objects of the extension (csrc/) stay for the symbol check below; the rest go now.
  [[ "$f" == csrc/* ]] || rm -f "$work/$i.o"
  printf 'check_cuda: %-4s %6ss  %s\n' "$([[ $rc == 0 ]] && echo ok || echo FAIL)" "$(cat "$work/$i.sec")" "$f"
}

running=0
for i in "${!files[@]}"; do
  if ((running >= JOBS)); then
    wait -n || true
    running=$((running - 1))
  fi
  compile_one "$i" "${files[$i]}" &
  running=$((running + 1))
done
wait || true

failed=0
for i in "${!files[@]}"; do
  rc=$(cat "$work/$i.rc" 2>/dev/null || echo 99)
  if [[ "$rc" != 0 ]]; then
    failed=$((failed + 1))
    echo
    echo "=== FAILED: ${files[$i]} (nvcc exit $rc) ==="
    echo "command: $(cat "$work/$i.cmd" 2>/dev/null)"
    cat "$work/$i.log" 2>/dev/null || true
  elif [[ -s "$work/$i.log" ]]; then
    echo "--- warnings from ${files[$i]}:"
    cat "$work/$i.log"
  fi
done
if ((failed)); then
  echo "check_cuda: $failed of ${#files[@]} file(s) FAILED to compile"
  exit 1
fi
echo "check_cuda: all ${#files[@]} file(s) compile"

# --- Symbol check (only when every file was compiled): the extension links csrc/**/*.{cu,cpp} into
# one library, and a moe_ext function declared in a header but defined (or explicitly
# instantiated) nowhere would only show on the GPU machine, as an "undefined symbol" at import.
# Every undefined moe_ext symbol of these objects must be defined by one of them. (Symbols of
# torch, CUDA and NCCL are not checked here: their headers compiled, and CMake links the kernel
# library into the benchmarks against the real CUDA and NCCL libraries.)
if (($# == 0)) && [[ "${MOE_EXT_CHECK_CPP:-1}" != 0 ]] && command -v nm >/dev/null; then
  objs=()
  for i in "${!files[@]}"; do [[ "${files[$i]}" == csrc/* && -f "$work/$i.o" ]] && objs+=("$work/$i.o"); done
  nm --defined-only -C "${objs[@]}" 2>/dev/null | awk 'NF >= 3 && $2 ~ /^[TWVBDRu]$/ { $1 = ""; $2 = ""; sub(/^  /, ""); print }' | sort -u >"$work/defined"
  nm --undefined-only -C "${objs[@]}" 2>/dev/null | awk '$1 == "U" { $1 = ""; sub(/^ /, ""); print }' | grep 'moe_ext::' | sort -u >"$work/wanted"
  missing=$(comm -23 "$work/wanted" "$work/defined")
  if [[ -n "$missing" ]]; then
    echo "check_cuda: symbols of moe_ext used but defined in no csrc/ object (the extension would fail to import):"
    echo "$missing" | sed 's/^/  /'
    exit 1
  fi
  echo "check_cuda: symbol check: every moe_ext symbol the ${#objs[@]} csrc/ objects use is defined by one of them ($(wc -l <"$work/wanted") checked)"
fi
