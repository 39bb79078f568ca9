"""Runs a function on every rank of a fresh gloo world of spawned processes.

    results = run_world(fn, world_size, *args, seed=seed)

fn(rank, world_size, *args) runs in each spawned process with the default process group
initialised (gloo, rendezvous through a FileStore in a fresh temporary directory), the global
RNG seeded with seed + rank and one intra-op thread. It returns a small picklable value (no
tensors); run_world returns them in rank order. A rank that raises or dies fails the call with
its traceback (the ranks still running FAILURE_GRACE_S later are killed); a world that has not
finished after `timeout_s` is killed and fails the call, so a hang can never hang the test suite.
fn must be a module-level function (spawn pickles it).
"""
import datetime
import os
import queue
import shutil
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _child(rank, world_size, store_file, seed, pg_timeout_s, fn, args, results):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
    except BaseException:  # noqa: B902
        results.put((rank, None, traceback.format_exc()))  # None: the rendezvous failed, before fn
        return
    try:
        try:
            torch.manual_seed(seed + rank)
            results.put((rank, True, fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: B902  (report everything, KeyboardInterrupt included)
        results.put((rank, False, traceback.format_exc()))


class _RendezvousFailed(AssertionError):
    """Every failed rank failed inside gloo's own rendezvous, before any test code ran."""


FAILURE_GRACE_S = 15.0  # how long the other ranks may still report after one failed


def run_world(fn, world_size, *args, seed=0, timeout_s=90.0, pg_timeout_s=30.0):
    """fn(rank, world_size, *args) on world_size spawned gloo ranks; returns the per-rank results.

    pg_timeout_s: the process group's timeout (how long a collective waits for a missing peer).
    timeout_s: hard limit for the whole world; past it every rank is killed and the call fails.
    """
    try:
        return _run_world_once(fn, world_size, args, seed, timeout_s, pg_timeout_s)
    except _RendezvousFailed:
        # NOTE: on a loaded machine gloo's TCP rendezvous itself can fail ("connectFullMesh failed
        # ... Connection closed by peer") before fn runs on any rank: one more try, a fresh world.
        return _run_world_once(fn, world_size, args, seed, timeout_s, pg_timeout_s)


def _run_world_once(fn, world_size, args, seed, timeout_s, pg_timeout_s):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix="moe_ext_dist_")
    procs = [ctx.Process(target=_child, daemon=True,
                         args=(r, world_size, os.path.join(tmp, "store"), seed, pg_timeout_s, fn, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    done, failures, grace, rendezvous = {}, {}, False, set()

    def failed():
        msg = "\n".join(f"--- rank {r} failed:\n{tb}" for r, tb in sorted(failures.items()))
        return _RendezvousFailed(msg) if set(failures) <= rendezvous else AssertionError(msg)

    try:
        while len(done) + len(failures) < world_size:
            if failures and not grace:
                # NOTE: the others are often left waiting for the failed rank (a collective, an ipc
                # flag) until their own timeouts: give them a moment to report, then kill them, so
                # the failure is reported now rather than at the world's (or the caller's) limit.
                grace, deadline = True, min(deadline, time.monotonic() + FAILURE_GRACE_S)
            try:
                rank, ok, value = results.get(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and r not in done and r not in failures]
                for r in dead:  # died without reporting (killed, segfault)
                    failures[r] = f"rank {r} exited with code {procs[r].exitcode} without a result"
                if time.monotonic() >= deadline:
                    missing = [r for r in range(world_size) if r not in done and r not in failures]
                    if failures:
                        late = f"\n--- ranks {missing} had not finished by then (killed)" if missing else ""
                        err = failed()
                        raise type(err)(str(err) + late) from None
                    raise AssertionError(f"world of {world_size} ranks did not finish within {timeout_s:.0f} s; "
                                         f"ranks still running: {missing}") from None
                continue
            (done if ok else failures)[rank] = value
            if ok is None:
                rendezvous.add(rank)
        if failures:
            raise failed()
        return [done[r] for r in range(world_size)]
    finally:
        for p in procs:
            p.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
        shutil.rmtree(tmp, ignore_errors=True)
