"""Builds the CPU emulation of the SIMT kernels (tests/emu/emu_cuda.h) into a shared library.

The kernel sources are copied from csrc/kernels (and csrc/comm/ep_ops*) with three mechanical
rewrites a C++ compiler needs: `kernel<<<grid, block, smem, stream>>>(args)` becomes
`::emu::launch(kernel, ::emu::Cfg(grid, block, smem, stream))(args)`, `extern __shared__ T
name[];` becomes a pointer to the launch's dynamic shared memory, and each inline PTX statement
becomes a call to its emulation (ASM below; an unknown one fails the build). Nothing else
changes: the library runs the kernels' own code.

    python tests/emu/build.py OUT_DIR     # prints the library's path
"""
import concurrent.futures
import fcntl
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
KERNELS = ROOT / "csrc" / "kernels"
# The kernel files the emulation runs: everything but the Hopper (TMA + wgmma) GEMMs.
SOURCES = ["kernels/gating.cu", "kernels/gating_f32.cu", "kernels/gating_f64.cu", "kernels/gating_f16.cu",
           "kernels/gating_bf16.cu", "kernels/permute.cu", "kernels/replicas.cu", "kernels/swiglu.cu", "kernels/ep.cu", "kernels/ep_index.cu", "comm/ep_ops.cu",
           "kernels/grouped_gemm.cu", "kernels/grouped_gemm_sm80_bf16_m64.cu", "kernels/grouped_gemm_sm80_bf16_m128.cu",
           "kernels/grouped_gemm_sm80_f16_m64.cu", "kernels/grouped_gemm_sm80_f16_m128.cu",
           "kernels/grouped_gemm_sm80_wgrad.cu"]
COMM = ROOT / "csrc" / "comm"
# Inline PTX -> its emulation (emu_cuda.h, emu_mma.h), keyed by the instruction; the replacement
# names the operands as the kernel sources do. Any other asm statement fails the build.
ASM = [
    ("st.release.sys.global.u64", "::emu::store_release_sys(p, v);"),
    ("ld.acquire.sys.global.u64", "v = ::emu::load_acquire_sys(p);"),
    ("%%globaltimer", "t = ::emu::global_ns();"),
    ("cp.async.cg.shared.global", "::emu::cp_async_16(dst, src, src_bytes);"),
    ("cp.async.commit_group", "::emu::cp_async_commit();"),
    ("cp.async.wait_group", "::emu::cp_async_wait(kPending);"),
    ("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", "::emu::ldmatrix_x4(r, addr, true);"),
    ("ldmatrix.sync.aligned.m8n8.x4.shared.b16", "::emu::ldmatrix_x4(r, addr, false);"),
    ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", "::emu::mma_m16n8k16<true>(c, a, b);"),
    ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "::emu::mma_m16n8k16<false>(c, a, b);"),
]
RUNTIME = [HERE / "emu_runtime.cpp", HERE / "emu_api.cpp", HERE / "emu_ep.cpp", HERE / "emu_gemm.cpp"]

_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:][\w:\s]*?)\s+(\w+)\s*\[\s*\]\s*;")


def _callee_start(text, end):
    """Start of the kernel expression that ends at `end` (just before `<<<`)."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if text[i - 1] == ">":  # template arguments
        depth = 0
        while True:
            i -= 1
            c = text[i]
            if c == ">":
                depth += 1
            elif c == "<":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def _replace_asm(text, name):
    out, pos = [], 0
    for m in re.finditer(r"\basm\s+volatile\s*\(", text):
        if m.start() < pos:
            continue
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        while text[i] in " \t":
            i += 1
        end = i + 1 if text[i] == ";" else i
        stmt = text[m.start():end]
        for key, repl in ASM:
            if key in stmt:
                break
        else:
            repl = None
        if repl is None:
            if name.startswith("grouped_gemm_sm90"):  # the Hopper kernels are copied, never compiled
                continue
            first = stmt.splitlines()[0]
            raise RuntimeError(f"emu build: {name}: inline assembly without an emulation: {first}")
        out.append(text[pos:m.start()] + repl)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def rewrite(text, name=""):
    text = _replace_asm(text, name)
    text = _SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::emu::dynamic_smem());", text)
    out = []
    pos = 0
    while True:
        a = text.find("<<<", pos)
        if a < 0:
            out.append(text[pos:])
            return "".join(out)
        b = text.find(">>>", a)
        start = _callee_start(text, a)
        out.append(text[pos:start])
        out.append("::emu::launch(" + text[start:a].strip() + ", ::emu::Cfg(" + text[a + 3:b] + "))")
        pos = b + 3


def build(out_dir, jobs=None):
    """Builds (once per source state) and returns the library's path; concurrent callers wait."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(out_dir, jobs)


def _build(out_dir, jobs):
    src_dir = out_dir / "src" / "kernels"
    src_dir.mkdir(parents=True, exist_ok=True)
    inputs = sorted(KERNELS.glob("*")) + sorted(COMM.glob("ep_ops*")) + sorted(COMM.glob("symmetric.cuh")) + sorted(HERE.rglob("*.h")) + sorted(HERE.rglob("*.cuh")) + RUNTIME + \
        [HERE / "include" / "cuda" / "functional", Path(__file__)]
    digest = hashlib.sha256(os.environ.get("MOE_EXT_EMU_ASAN", "").encode())
    for f in inputs:
        digest.update(f.name.encode() + f.read_bytes())
    lib = out_dir / f"libmoe_emu_{digest.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    (out_dir / "src" / "comm").mkdir(exist_ok=True)
    for d in (KERNELS, COMM):
        for f in d.iterdir():
            if f.suffix in (".cu", ".cuh") and (d == KERNELS or f.stem in ("ep_ops", "symmetric")):
                (out_dir / "src" / d.name / f.name).write_text(rewrite(f.read_text(), f.name))
    cxx = os.environ.get("CXX", "g++")
    asan = ["-fsanitize=address", "-fno-omit-frame-pointer"] if os.environ.get("MOE_EXT_EMU_ASAN") == "1" else []
    flags = [*asan, "-std=c++20", "-O2", "-g0", "-fPIC", "-ffp-contract=off", "-Wno-unknown-pragmas", "-Wno-attributes",
             "-I", str(HERE / "include"), "-I", str(HERE), "-I", str(out_dir / "src"),
             "-include", str(HERE / "emu_cuda.h"), "-include", str(HERE / "emu_mma.h")]
    units = [out_dir / "src" / s for s in SOURCES] + RUNTIME
    objs = [out_dir / (u.stem + ("_k" if u.suffix == ".cu" else "") + ".o") for u in units]

    def compile_one(u, o):
        lang = ["-x", "c++"] if u.suffix == ".cu" else []
        r = subprocess.run([cxx, *flags, "-c", *lang, str(u), "-o", str(o)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"emu build: {u.name} failed:\n{r.stderr[-6000:]}")

    with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count() or 2) as ex:
        for f in [ex.submit(compile_one, u, o) for u, o in zip(units, objs)]:
            f.result()
    tmp = lib.with_suffix(".tmp")
    r = subprocess.run([cxx, *asan, "-shared", "-o", str(tmp), *map(str, objs)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"emu build: link failed:\n{r.stderr[-6000:]}")
    tmp.replace(lib)
    return lib


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else ROOT / "build" / "emu"))
