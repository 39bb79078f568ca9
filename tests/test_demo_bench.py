"""`moe-ext demo` (training with EP over gloo ranks) and `moe-ext bench` (stages vs torch baselines),
run through their add_arguments/run entry points on tiny sizes."""
import argparse
import json

import pytest
import torch

from moe_ext import bench, demo


def _args(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def _run_demo(tmp_path, world, steps, *extra):
    out = tmp_path / f"demo_w{world}.json"
    argv = ["--world", str(world), "--steps", str(steps), "--tokens", "128", "--log-every", "5", "--no-progress",
            "--png", "none", "--json", str(out), "--timeout", "30", *extra]
    assert demo.run(_args(demo, argv)) == 0
    return json.loads(out.read_text())


def _check_history(doc, steps, world, layers=2, experts=8):
    assert doc["config"]["world"] == world and len(doc["loss"]) == steps == len(doc["steps"])
    for key in ("aux_loss", "drop_rate", "load", "max_over_mean"):
        assert len(doc[key]) == steps, key
    loads = torch.tensor(doc["load"])
    assert loads.shape == (steps, layers, experts)
    assert torch.allclose(loads.sum(-1), torch.ones(steps, layers, dtype=loads.dtype), atol=1e-6)
    assert all(0.0 <= d < 1.0 for d in doc["drop_rate"])
    assert all(m >= 1.0 - 1e-9 for row in doc["max_over_mean"] for m in row)
    assert all(a > 0 for a in doc["aux_loss"])
    # The loss goes down: the head starts at zero (loss ~ 1, the targets' variance).
    first, last = sum(doc["loss"][:3]) / 3, sum(doc["loss"][-3:]) / 3
    assert 0.5 < doc["loss"][0] < 2.0
    assert last < 0.8 * first, (first, last)
    assert doc["summary"]["loss_last"] < doc["summary"]["loss_first"]
    assert doc["tokens_per_s_mean"] > 0 and doc["tokens_per_s"]


def test_demo_world1_in_process(tmp_path, capfd):
    doc = _run_demo(tmp_path, 1, 20)
    _check_history(doc, 20, 1)
    out = capfd.readouterr().out
    assert "step    20" in out and "done: 20 steps" in out and "max/mean" in out


def test_demo_world2_gloo(tmp_path, capfd):
    doc = _run_demo(tmp_path, 2, 20, "--balance", "both")
    _check_history(doc, 20, 2)
    assert "2 EP rank(s)" in capfd.readouterr().out


def test_demo_same_training_whatever_the_world(tmp_path):
    """W=1 and W=2 train the same model: same initial weights, the W=2 global batch equals the
    W=1 batch of twice the tokens, replicated gradients are all-reduced, expert gradients summed
    by dispatch/combine. Without capacity (per-rank) and aux loss (per-rank statistics) the
    losses of the first steps agree up to float rounding."""
    one = _run_demo(tmp_path, 1, 3, "--tokens", "256", "--capacity-factor", "0", "--balance", "none")
    two = _run_demo(tmp_path, 2, 3, "--capacity-factor", "0", "--balance", "none")
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-4)
    assert one["loss"][2] < one["loss"][0]


def test_demo_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "load.png"
    argv = ["--world", "1", "--steps", "4", "--tokens", "64", "--no-progress", "--png", str(png)]
    assert demo.run(_args(demo, argv)) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_bad_arguments(capsys):
    assert demo.run(_args(demo, ["--world", "3", "--experts", "8"])) == 2
    assert "multiple of --world" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert demo.run(_args(demo, ["--device", "cuda", "--world", "1"])) == 2
        assert "no CUDA device" in capsys.readouterr().err
    # Multi-rank CUDA needs a GPU and the CUDA build (the ipc / nccl backends); else it says why.
    why = demo._cuda_multirank_problem(2)
    assert why is None or "CUDA" in why


_TINY = ["--device", "cpu", "--shape", "custom", "--tokens", "64", "--hidden", "32", "--ffn", "48", "--experts", "4",
         "--topk", "2", "--iters", "2", "--warmup", "1", "--no-progress"]


def test_bench_tiny_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.run(_args(bench, _TINY + ["--json", str(out)])) == 0
    doc = json.loads(out.read_text())
    meta, rows = doc["meta"], doc["rows"]
    assert meta["device_type"] == "cpu" and meta["torch"] == torch.__version__ and meta["dtype"] == "float32"
    assert "git_commit" in meta and meta["config"]["tokens"] == 64
    assert not doc["failed"] and not doc["wrong"]
    timed = [r for r in rows if "skipped" not in r]
    stages = {r["stage"].split(" (")[0] for r in timed}
    assert stages == set(bench.STAGES)
    for r in timed:
        assert r["ours_ms"] > 0 and r["base_ms"] > 0 and r["speedup"] > 0, r
        assert r["work"] > 0 and r["rate"] > 0 and r["frac_ceil"] is None, r
        assert r["ok"] and r["max_err"] <= max(r["tol"], 1e-4), r
    exact = [r for r in timed if r["stage"].startswith(("permute", "dispatch"))]
    assert len(exact) == 2 and all(r["max_err"] == 0 for r in exact)
    assert {r["baseline"] for r in timed if r["stage"] == "gemm up"} >= {"torch.mm per expert"}
    text = capsys.readouterr().out
    for name in ("gating", "permute", "unpermute", "gemm up", "gemm down", "dispatch (W=1)", "combine (W=1)",
                 "layer fwd+bwd"):
        assert name in text
    assert "n/a" in text


def test_bench_png_and_subset(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    assert bench.run(_args(bench, _TINY + ["--stages", "gating,unpermute", "--png", str(png)])) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_bad_arguments(capsys):
    assert bench.run(_args(bench, _TINY + ["--topk", "5"])) == 2
    assert "--topk" in capsys.readouterr().err
    assert bench.run(_args(bench, _TINY + ["--stages", "gating,nope"])) == 2
    assert "unknown stage" in capsys.readouterr().err
    for flag, value in (("--threads", "-1"), ("--iters", "0"), ("--warmup", "-2")):
        assert bench.run(_args(bench, _TINY + [flag, value])) == 2
        assert f"{flag} must be >=" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["check", "--topk", "5", "--experts", "4"], "--topk 5 must be <= --experts 4"),
    (["check", "--tokens", "0"], "--tokens must be >= 1"),
    (["check", "--iters", "0"], "--iters must be >= 1"),
    (["check", "--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["demo", "--world", "0"], "--world must be >= 1"),  # before the layer check, which takes seconds
])
def test_cli_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    from moe_ext.cli import main
    assert main(argv + ["--device", "cpu"] if "--device" not in argv else argv) == 2
    assert message in capsys.readouterr().err


def test_ep_tp_bench_runs_and_counts_rows(tmp_path):
    """bench/ep_tp_bench.py on tiny sizes (4 gloo ranks): both EP x TP token paths agree (the script
    checks it before timing) and its row counts obey gather - direct = (tp - 1)(R - D)."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "bench" / "ep_tp_bench.py"
    out = tmp_path / "ep_tp.json"
    subprocess.run([sys.executable, str(script), "--ep", "2", "--tp", "2", "--tokens", "40", "--hidden", "32",
                    "--ffn", "32", "--experts", "8", "--k", "3", "--iters", "1", "--warmup", "0", "--json", str(out)],
                   check=True, capture_output=True, timeout=180)
    doc = json.loads(out.read_text())
    (gd, gt, gc), (dd, dt, dc) = doc["rows"]["gather"], doc["rows"]["direct"]
    D, R = gd, gc
    assert dd == 2 * D and dc == 2 * R and dt == 0 and gt == 2 * R and D <= R <= 4 * 40 * 3
    assert doc["ms"]["gather"] > 0 and doc["ms"]["direct"] > 0


def test_profile_kernels_small_cpu(tmp_path):
    """bench/profile_kernels.py --small on the CPU: every case profiled, the kept-activation layer
    runs the SwiGLU op and the recomputing one does not (the GPU run profiles kernels instead)."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "bench" / "profile_kernels.py"
    out = tmp_path / "prof.json"
    subprocess.run([sys.executable, str(script), "--small", "--device", "cpu", "--iters", "1", "--warmup", "1",
                    "--json", str(out)], check=True, capture_output=True, timeout=180)
    cases = json.loads(out.read_text())["cases"]
    # layer (kept, recomputed), gating (full, decode), permute
    assert len(cases) == 5 and all(c["total_us"] > 0 for c in cases.values())
    assert sum(label.startswith("gating") and "'T': 128" in label for label in cases) == 1
    kept, recomputed = (next(c for label, c in cases.items() if label.startswith("layer") and tag(label))
                        for tag in (lambda s: "recompute" not in s, lambda s: "recompute" in s))
    names = lambda c: {k["name"] for k in c["kernels"]}  # noqa: E731
    assert "moe_ext::swiglu" in names(kept) and "moe_ext::swiglu" not in names(recomputed)


def test_layer_decode_bench_tiny_cpu(tmp_path):
    """bench/layer_decode_bench.py on the CPU: the decode path equals the torch loop (the script
    checks it before reporting) and every time is filled in."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "bench" / "layer_decode_bench.py"
    out = tmp_path / "decode.json"
    subprocess.run([sys.executable, str(script), "--device", "cpu", "--shape", "tiny", "--tokens", "1", "5",
                    "--iters", "2", "--json", str(out)], check=True, capture_output=True, timeout=180)
    rows = json.loads(out.read_text())["rows"]
    assert [r["T"] for r in rows] == [1, 5]
    for r in rows:
        assert 1 <= r["experts_used"] <= min(r["E"], r["T"] * r["k"]) and r["floor_us"] > 0
        assert r["decode_eager_us"] > 0 and r["fwd_eager_us"] > 0 and r["torch_eager_us"] > 0
