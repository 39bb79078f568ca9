"""The `nccl` backend of dispatch/combine: CUDA tensors over W > 1 ranks through NCCL send/recv.

It is the protocol of moe_ext.dispatch's `_AllToAllBackend` (the gloo backend), unchanged: the
header exchange with its agreement checks, each token sent once per destination rank with its
local expert ids, the permute into the expert-major layout on the receiver, the capacity
feedback, combine sending every kept slot's row back, scatter_grad for the backward. Only the
transport differs: every exchange is one grouped ncclSend/ncclRecv per peer, of bytes, on an
NCCL communicator of our own (csrc/comm/nccl_comm.cu, torch.classes.moe_ext.NcclComm). It is
made from the user's ProcessGroup once per (group, device): rank 0 of the group creates the
unique id, the id goes round the group (any backend, gloo included), every rank joins. After
that the ProcessGroup is not used.

Synchronisation: the exchanges run on the current CUDA stream and the host waits for each one
(bounded, see below); the protocol reads sizes back to the host between them anyway. So
async_op=True is accepted and the work is complete when dispatch/combine return (last_work is
None; handle.wait() returns at once). sync=False (the masked no-sync layout) works too, through
the exact layout, but it synchronises the host: the no-sync, CUDA-graph path is the ipc
backend's.

Failures: every wait (joining the communicator, each exchange, close) gives up after the
backend's `timeout` (default 60 s, settable: moe_ext.communicator(group, backend="nccl").timeout
= 5, or DEFAULT_TIMEOUT_S before the first call). A rank that never makes the call makes the
others raise a RuntimeError naming it. NCCL itself cannot tell which peer is missing, so the
ranks that timed out find out through the ProcessGroup's key-value store, on the failure path
only: each writes a key for the exchange it gave up on, waits a short while for the keys of the
others, and names the ranks whose key never came (they never reached that exchange: missing,
stuck elsewhere or dead). The happy path never touches the store. The communicator is then
aborted and leaves the cache: the next dispatch makes a new one (a collective again, on every
rank). Mismatched inputs (hidden size, dtypes, num_experts, k, ...)
are caught by the header exchange as with gloo, naming each rank's value.
"""
import atexit
import os
import time
import warnings

import torch
import torch.distributed as dist

from .dispatch import _AllToAllBackend

DEFAULT_TIMEOUT_S = 60.0
_UNIQUE_ID_BYTES = 128
_NO_ID = b"moe_ext:failed:"  # what rank 0 broadcasts instead of a unique id when it cannot make one
# NcclComm.state(): 0 new, 1 ready, 2 closed, 3 aborted after a timeout, 4 aborted after an error
_READY, _CLOSED, _TIMED_OUT, _FAILED = 1, 2, 3, 4


def _comm_class():
    """torch.classes.moe_ext.NcclComm; RuntimeError where this build has no CUDA backends."""
    from . import _ops  # noqa: F401  (loads moe_ext._C, which registers the class)

    try:
        return torch.classes.moe_ext.NcclComm
    except (AttributeError, RuntimeError) as e:
        raise RuntimeError("moe_ext nccl backend: this build of moe_ext has no CUDA backends (it was built without "
                           "CUDA); reinstall it with a CUDA build of torch to dispatch CUDA tensors over NCCL") from e


def available():
    """True where this build has the nccl backend (a CUDA build) and a CUDA device is visible."""
    if not torch.cuda.is_available():
        return False
    try:
        _comm_class()
    except RuntimeError:
        return False
    return True


class NcclBackend(_AllToAllBackend):
    """The gloo protocol over an NCCL communicator of our own, for CUDA tensors on `device`.

    Made by nccl_backend() (cached per group and device); creating one is a collective over the
    group. timeout: seconds any wait gives up after. close(): ends the communicator (every rank).
    """
    name = "nccl"
    last_work = None  # NOTE: every exchange completes before returning (see the module docstring)

    def __init__(self, group, world, rank, device, timeout=None):
        super().__init__(group, world, rank)
        self.device = torch.device(device)
        self._timeout = float(DEFAULT_TIMEOUT_S if timeout is None else timeout)
        if not self._timeout > 0:
            raise ValueError(f"moe_ext nccl backend: timeout must be > 0 seconds, got {timeout}")
        self._key = None  # set by nccl_backend() when cached
        # The exchange sequence number and the communicator's tag (from its unique id, the same on
        # every rank) name an exchange in the store when a timeout must find the missing rank.
        self._exchanges = 0
        self._tag = "0"
        self._c = self._connect()

    # ---- the communicator ------------------------------------------------------------------------
    def _connect(self):
        """Creates the NCCL communicator: unique id from rank 0 of the group, through the group, then
        every rank joins (bounded by the timeout)."""
        # NOTE: a rank that fails here still takes part in the broadcast (rank 0 sends the error
        # instead of the id), so its peers raise at once instead of waiting in the broadcast for
        # the ProcessGroup's timeout; a failure elsewhere ends in init, bounded by our timeout.
        if os.environ.get("NCCL_COMM_BLOCKING") == "1":
            warnings.warn("moe_ext nccl backend: NCCL_COMM_BLOCKING=1 makes NCCL's init and its grouped sends block "
                          "without a bound, so a missing peer can hang them instead of failing after the timeout; "
                          "unset it to keep moe_ext's timeouts", RuntimeWarning, stacklevel=3)
        c, failure = None, None
        try:
            c = _comm_class()(self.device.index, self.world, self.rank, self._timeout)
            box = [bytes(c.unique_id().tolist()) if self.rank == 0 else bytes(_UNIQUE_ID_BYTES)]
        except RuntimeError as e:
            failure, box = e, [_NO_ID + str(e).encode()]
        # NOTE: broadcast_object_list picks the group's device (the CPU for gloo, the current CUDA
        # device for an NCCL-only group): make that ours.
        with torch.cuda.device(self.device):
            dist.broadcast_object_list(box, src=self.ranks[0], group=self.group)
        if failure is not None:
            raise failure
        if box[0].startswith(_NO_ID):
            raise RuntimeError(
                f"moe_ext nccl backend: global rank {self.ranks[0]} (rank 0 of the group with global ranks "
                f"{self.ranks}) could not create the NCCL communicator, so no rank can join it. Its error: "
                f"{box[0][len(_NO_ID):].decode(errors='replace')}")
        self._tag = bytes(box[0][:16]).hex()
        try:
            c.init(torch.tensor(list(box[0]), dtype=torch.uint8))
        except RuntimeError as e:
            raise RuntimeError(
                f"moe_ext nccl backend: rank {self.rank} of the group with global ranks {self.ranks} could not join "
                f"the NCCL communicator on {self.device} (every rank of the group must make the same first "
                f"dispatch call; NCCL refuses two ranks on one GPU). Cause: {e}") from e
        return c

    @property
    def timeout(self):
        return self._timeout

    @timeout.setter
    def timeout(self, seconds):
        if not seconds > 0:
            raise ValueError(f"moe_ext nccl backend: timeout must be > 0 seconds, got {seconds}")
        self._timeout = float(seconds)
        if self._c is not None:
            self._c.set_timeout(self._timeout)

    @property
    def nbytes(self):
        """Device bytes this communicator holds for moe_ext: none (the exchanges use the caller's
        tensors; NCCL's own internal buffers are NCCL's)."""
        return 0

    @property
    def closed(self):
        return self._c is None or int(self._c.state()) != _READY

    def close(self, abort=False):
        """Ends the communicator: orderly on every rank (bounded by the timeout), or with abort=True
        locally without waiting for the peers. Leaves the cache; safe to call twice."""
        _forget(self)
        c, self._c = self._c, None
        if c is None:
            return
        if abort:
            c.abort()
        else:
            c.close()

    # ---- the transport: the two hooks of _AllToAllBackend ------------------------------------------
    def _all_to_all(self, send, send_splits, recv_splits, stage):
        recv = send.new_empty((sum(recv_splits),) + tuple(send.shape[1:]))
        self._run(send.contiguous(), recv, send_splits, recv_splits, stage)
        return recv

    def _header_all_to_all(self, row):
        """The header rows through the communicator (on the device and back), [W, len(_HEADER)]
        int64 on the CPU; the base class checks them."""
        send = row.to(self.device, torch.int64).contiguous()
        recv = torch.full_like(send, -1)
        ones = [1] * self.world
        self._run(send, recv, ones, ones, "header")
        return recv.cpu()

    def _run(self, send, recv, send_splits, recv_splits, stage):
        if self._c is None:
            raise self._fail(stage, "the communicator was closed (close()); the next dispatch makes a new one")
        self._exchanges += 1
        try:
            self._c.alltoallv(send, recv, list(send_splits), list(recv_splits))
        except RuntimeError as e:
            raise self._fail(stage, e) from e

    def _fail(self, stage, err, extra=""):
        op = "combine" if stage.startswith("combine") else "dispatch"
        state = int(self._c.state()) if self._c is not None else _CLOSED
        me = self.ranks[self.rank]
        if state in (_TIMED_OUT, _FAILED):
            _forget(self)  # aborted: the next dispatch makes a new communicator
        if state == _TIMED_OUT:
            missing = self._missing_ranks()
            if missing:
                who = (f"global rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} never reached "
                       "this exchange (it did not make the same dispatch/combine call, is stuck elsewhere, or died)")
            elif missing is None:
                others = [r for r in self.ranks if r != me]
                who = (f"one or more of the other ranks {others} did not make the same dispatch/combine call, or "
                       "died (NCCL cannot tell which, and the ProcessGroup's store could not be asked)")
            else:
                who = ("every rank reached this exchange, so a peer is too slow or the transport is stuck, not "
                       "missing")
            return RuntimeError(
                f"moe_ext.{op}: the {stage} exchange (nccl backend) did not complete within {self._timeout:g} s on "
                f"global rank {me} of the group with global ranks {self.ranks}: {who}. The communicator was "
                "aborted on this rank, and the next dispatch makes a new one; a rank that did not time out still "
                "holds the old one, so before going on every rank must either see this error or call "
                "moe_ext.communicator(group, backend='nccl').close(abort=True) (set the wait with its .timeout)"
                f"{extra}. Cause: {err}")
        return RuntimeError(
            f"moe_ext.{op}: the {stage} exchange (nccl backend) failed on global rank {me} of the group with global "
            f"ranks {self.ranks}{extra}. Every rank of the group must make the same dispatch/combine calls. "
            f"Cause: {err}")


    def _missing_ranks(self):
        """After a timed-out exchange: the global ranks that never reached it, found through the
        default ProcessGroup's store (None when there is no store). Every rank that gives up writes
        the number of the exchange it gave up in, then waits up to half the timeout (at most 10 s)
        for the others'. A rank counts as present once its number is at least ours: one that had no
        rows to swap with the missing rank completes this exchange and gives up in a later one."""
        try:
            store = dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001  (no default group, or a torch without the helper)
            return None
        prefix = f"moe_ext/nccl/{self._tag}/gave-up-in/"
        me = self.ranks[self.rank]
        try:
            store.set(prefix + str(me), str(self._exchanges))
            pending = [r for r in self.ranks if r != me]
            deadline = time.monotonic() + min(0.5 * self._timeout, 10.0)
            while True:
                pending = [r for r in pending if not (store.check([prefix + str(r)])
                                                      and int(store.get(prefix + str(r))) >= self._exchanges)]
                if not pending or time.monotonic() >= deadline:
                    return pending
                time.sleep(0.05)
        except Exception:  # noqa: BLE001  (the store itself is unreachable: say so, do not mask the timeout)
            return None


# ---- the communicators, one per (group, device) -----------------------------------------------

_BACKENDS = {}


def _forget(backend):
    if backend._key is not None and _BACKENDS.get(backend._key) is backend:
        del _BACKENDS[backend._key]
    backend._key = None


def nccl_backend(group, world, rank, device):
    """The cached nccl backend of (group, device), created on first use (a collective over the group:
    every rank must get here together, which the first dispatch on every rank does)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"moe_ext nccl backend: moves CUDA tensors, got device {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (group, device.index)
    backend = _BACKENDS.get(key)
    if backend is None or backend.closed:
        backend = NcclBackend(group, world, rank, device)
        backend._key = key
        _BACKENDS[key] = backend
    return backend


def close_all(abort=False):
    """Closes every cached nccl communicator of this process (see NcclBackend.close)."""
    for backend in list(_BACKENDS.values()):
        try:
            backend.close(abort=abort)
        except RuntimeError:
            backend.close(abort=True)
    _BACKENDS.clear()


@atexit.register
def _close_at_exit():
    # NOTE: abort, not the orderly close: at exit the peers may already be gone, and the orderly
    # close would wait for them; nothing is in flight (every exchange completes before returning).
    try:
        close_all(abort=True)
    except Exception:  # noqa: BLE001  (process exit: the driver frees what is left)
        pass
