"""Scaling out with torchrun: the launcher's processes are the EP ranks (gloo on the CPU here).

`torchrun -m moe_ext demo` must train exactly what the demo's own spawned ranks train, and the
example examples/torchrun_train.py (EP x TP) must run and keep its replicated weights identical.
Run as `python -m torch.distributed.run`, the module torchrun's console script calls."""
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "torchrun_train.py"


def _torchrun(nproc, *argv, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *map(str, argv)]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


DEMO = ["--steps", "12", "--tokens", "128", "--log-every", "4", "--no-progress", "--png", "none", "--timeout", "60"]


def test_demo_under_torchrun_trains_what_spawned_ranks_train(tmp_path):
    # NOTE: --world 3 is ignored under torchrun: the launcher's 2 processes are the ranks.
    _torchrun(2, "-m", "moe_ext", "demo", "--skip-check", "--world", "3", *DEMO, "--json", tmp_path / "torchrun.json",
              cwd=tmp_path)
    subprocess.run([sys.executable, "-m", "moe_ext", "demo", "--skip-check", "--world", "2", *DEMO,
                    "--json", tmp_path / "spawned.json"], cwd=tmp_path, check=True, capture_output=True, timeout=180)
    a = json.loads((tmp_path / "torchrun.json").read_text())
    b = json.loads((tmp_path / "spawned.json").read_text())
    assert a["config"]["world"] == b["config"]["world"] == 2
    for key in ("loss", "aux_loss", "drop_rate", "load"):
        assert a[key] == b[key], key


@pytest.mark.parametrize("nproc,tp", [(2, 1), (4, 2)])
def test_example_ep_and_ep_x_tp(tmp_path, nproc, tp):
    out = _torchrun(nproc, EXAMPLE, "--steps", "12", "--tp", tp, cwd=tmp_path)
    assert f"EP {nproc // tp} x TP {tp}" in out
    losses = [float(line.split()[3]) for line in out.splitlines() if line.startswith("step")]
    assert len(losses) == 3 and losses[-1] < losses[0], out
    assert f"ok: replicated weights and expert bias identical on all {nproc} ranks" in out
