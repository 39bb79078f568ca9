"""Spawned ranks for the multi-rank Python benchmarks in bench/ (run as scripts from any directory:
the script's own folder is on sys.path, so `from spawn_ranks import run_ranks` finds this file)."""
import os
import queue
import tempfile
import time

import torch.multiprocessing as mp


def run_ranks(target, args, world, timeout_s=600.0, poll_s=2.0):
    """target(rank, args, store_path, results) in `world` spawned processes; each puts its result
    on `results`. Returns (the results in arrival order, the ranks' exit codes). Waits at most
    timeout_s, and no longer once a rank has died: its peers are then killed, so a failure ends
    the run at once rather than at the time limit."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="moe_ext_bench_") as tmp:
        procs = [ctx.Process(target=target, args=(r, args, os.path.join(tmp, "store"), results))
                 for r in range(world)]
        for p in procs:
            p.start()
        got, deadline = [], time.monotonic() + timeout_s
        while len(got) < world and time.monotonic() < deadline:
            try:
                got.append(results.get(timeout=poll_s))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return got, [p.exitcode for p in procs]
