"""MoE layer decode steps at a world of one: moe_ext.MoE(decode=True) against an eager torch layer.

    python bench/layer_decode_bench.py                        # Mixtral and DeepSeek-V3-like, T = 1, 32, 128
    python bench/layer_decode_bench.py --json bench/results/layer_decode.json
    python bench/layer_decode_bench.py --device cpu --shape tiny   # a smoke run without a GPU

A decode step moves the weights of every expert its tokens choose, so the floor is those bytes
(each distinct expert's w1 [H, 2F] and w2 [F, H], counted from the step's routing) at GPU.md's
2.95 TB/s copy ceiling. Times per layer forward, medians (CUDA events, L2 flushed unless
--no-flush):
  - moe_ext decode eager: layer(x, decode=True) as called (host launch overhead included),
  - moe_ext decode graph: the same forward captured once in a CUDA graph and replayed,
  - moe_ext forward eager: layer(x) (the training layout, no host sync at a world of one),
  - torch eager: the same weights in the Hugging Face style loop (softmax / sigmoid routing,
    per expert: the tokens that chose it, its SwiGLU MLP, index_add of the weighted rows), which
    reads the token lists back to the host once per expert and cannot be captured.
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from cuda_timer import CudaTimer

import moe_ext

SHAPES = {
    # H, F, E, k, routing options
    "mixtral": (4096, 14336, 8, 2, dict()),
    "deepseek-v3": (7168, 2048, 256, 8, dict(score="sigmoid", num_groups=8, topk_groups=4, expert_bias=True)),
    "tiny": (64, 128, 16, 4, dict()),
}


def torch_decode(layer, x):
    """The eager loop of Hugging Face's MoE blocks, on the layer's own weights and routing."""
    w, idx, _ = layer.route(x)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    F2 = layer.w1.shape[2] // 2
    for e in torch.unique(idx[idx >= 0]).tolist():  # NOTE: one host read, as HF's expert mask loop
        t, j = (idx == e).nonzero(as_tuple=True)
        h = x[t] @ layer.w1[e]
        y = (F.silu(h[:, :F2]) * h[:, F2:]) @ layer.w2[e]
        out.index_add_(0, t, y.float() * w[t, j].unsqueeze(1))
    return out.to(x.dtype)


def cpu_timed(fn, iters):
    """Median microseconds of fn() on the CPU."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), nargs="+", default=["mixtral", "deepseek-v3"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-flush", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("layer_decode_bench: no CUDA device; skipped")
        return 0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        timer = CudaTimer(args.iters, 5, not args.no_flush)
        eager, graph = (lambda fn: timer.eager(fn)[0]), (lambda fn: timer.graph(fn)[0])
    else:
        eager, graph = (lambda fn: cpu_timed(fn, args.iters)), (lambda fn: float("nan"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# layer_decode_bench: {name}, torch {torch.__version__}, {dtype}, median of {args.iters}")
    print(f"# {'shape':<12} {'T':>4} {'floor us':>9} {'decode eager':>13} {'decode graph':>13} "
          f"{'fwd eager':>10} {'torch eager':>12} {'graph/floor':>12}")
    rows = []
    for shape in args.shape:
        H, Fh, E, k, opts = SHAPES[shape]
        torch.manual_seed(0)
        layer = moe_ext.MoE(H, Fh, E, k, max_decode_tokens=max(args.tokens), device=device, dtype=dtype, **opts)
        layer.eval()
        for T in args.tokens:
            x = torch.randn(T, H, device=device, dtype=dtype)
            with torch.no_grad():
                _, idx, _ = layer.route(x)
                used = int(torch.unique(idx[idx >= 0]).numel())
                floor_us = used * 3 * H * Fh * layer.w1.element_size() / 2.95e12 * 1e6
                t = {"decode eager": eager(lambda: layer(x, decode=True)), "fwd eager": eager(lambda: layer(x)),
                     "torch eager": eager(lambda: torch_decode(layer, x)),
                     "decode graph": graph(lambda: layer(x, decode=True))}
                torch.testing.assert_close(layer(x, decode=True).float(), torch_decode(layer, x).float(),
                                           rtol=2e-2, atol=2e-2)
            print(f"  {shape:<12} {T:>4} {floor_us:9.1f} {t['decode eager']:13.1f} {t['decode graph']:13.1f} "
                  f"{t['fwd eager']:10.1f} {t['torch eager']:12.1f} {floor_us / t['decode graph']:11.0%}")
            times = {key.replace(" ", "_") + "_us": v for key, v in t.items()}
            rows.append(dict(shape=shape, T=T, H=H, F=Fh, E=E, k=k, experts_used=used, floor_us=floor_us,
                             device=name, dtype=str(dtype), **times))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(benchmark="layer_decode_bench", device=name, torch=torch.__version__, rows=rows), f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
