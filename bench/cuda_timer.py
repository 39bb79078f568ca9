"""CUDA-event timing shared by the Python benchmarks in bench/ (run as scripts from any directory:
the script's own folder is on sys.path, so `from cuda_timer import CudaTimer` finds this file)."""
import statistics

import torch


class CudaTimer:
    """Median and standard deviation, in microseconds, of CUDA-event pairs around each call.

    L2 is evicted before every timed call (a fill of twice its size, as bench/common.cuh does)
    unless flush=False, so inputs below the L2 size are not timed from cache."""

    def __init__(self, iters, warmup, flush=True):
        self.iters, self.warmup = iters, warmup
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        l2 = getattr(props, "L2_cache_size", 0) or (50 << 20)
        self.flush_buf = torch.empty(2 * l2, dtype=torch.uint8, device="cuda") if flush else None

    def _measure(self, run, host=False):
        """host: the host waits for the flush before timing, so the launch overhead of run() is
        inside the events (else the host enqueues run() while the GPU still flushes)."""
        events = []
        for i in range(self.iters):
            if self.flush_buf is not None:
                self.flush_buf.fill_(i & 0xFF)
            if host:
                torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        us = [s.elapsed_time(e) * 1e3 for s, e in events]
        return statistics.median(us), (statistics.stdev(us) if len(us) > 1 else 0.0)

    def eager(self, fn):
        """fn() as called: includes the host's launch overhead where the host is the slower side."""
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        return self._measure(fn, host=True)

    def graph(self, fn):
        """fn() captured once in a CUDA graph and replayed: GPU time only."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(max(self.warmup, 2)):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        for _ in range(self.warmup):
            g.replay()
        torch.cuda.synchronize()
        return self._measure(g.replay)

    __call__ = eager
