// The nccl backend's communicator: an NCCL communicator of our own for one (group, device), and
// the one movement the dispatch/combine protocol needs from it, an all-to-all of bytes with
// uneven 64-bit counts and offsets. Torch-free: the caller moves the 128-byte unique id between
// the ranks (moe_ext/_nccl.py over the user's ProcessGroup; a C++ benchmark over shared memory)
// and passes raw pointers and a cudaStream_t.
//
//   NcclComm comm(device, world, rank, timeout_s);   // nothing collective yet
//   NcclUniqueId id = NcclComm::unique_id();         // on rank 0 only, then sent to every rank
//   comm.init(id);                                   // every rank: joins the communicator
//   comm.alltoallv(send, send_bytes, send_offsets, recv, recv_bytes, recv_offsets, stream);
//   comm.wait(stream, "token exchange");             // the host waits for the stream, bounded
//   comm.destroy();                                  // every rank (abort() after a failure)
//
// NOTE: NCCL blocks forever when a peer never makes the matching call. The communicator is made
// nonblocking (ncclConfig_t::blocking = 0), so every wait here is our own polling loop bounded by
// timeout_s: on expiry the communicator is aborted (ncclCommAbort), the call throws, and every
// later call throws too. NCCL cannot tell which peer is missing, so neither can the message.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <array>
#include <cstdint>
#include <string>

namespace moe_ext::comm {

using NcclUniqueId = std::array<char, NCCL_UNIQUE_ID_BYTES>;

// Where a communicator stands; kTimedOut and kFailed mean it was aborted.
enum class NcclState : int { kNew = 0, kReady = 1, kClosed = 2, kTimedOut = 3, kFailed = 4 };

class NcclComm {
 public:
  static constexpr double kDefaultTimeoutS = 60.0;

  // A fresh unique id (ncclGetUniqueId): made by one rank, given to every rank's init().
  static NcclUniqueId unique_id();
  // The NCCL library's version code at run time (e.g. 22809 for 2.28.9).
  static int version();

  NcclComm(int device, int world, int rank, double timeout_s = kDefaultTimeoutS);
  ~NcclComm();  // aborts a communicator that was not destroyed (never waits for peers)
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  // Joins the communicator of `id` as `rank` of `world` on `device`; returns once every rank has
  // joined, or throws after timeout_s (the communicator is then aborted).
  void init(const NcclUniqueId& id);

  // Enqueues on `stream`: to every peer p, send_bytes[p] bytes from send + send_offsets[p], and
  // from every peer p, recv_bytes[p] bytes into recv + recv_offsets[p] (one grouped ncclSend /
  // ncclRecv per peer, this rank included; zero-byte peers are skipped). Every array has world
  // entries; the peers' counts must match (what p sends here is what this rank receives from p).
  // Returns once the operations are on the stream, not once they completed: see wait().
  void alltoallv(const void* send, const int64_t* send_bytes, const int64_t* send_offsets, void* recv,
                 const int64_t* recv_bytes, const int64_t* recv_offsets, cudaStream_t stream);

  // Blocks the host until everything enqueued on `stream` so far has completed, polling the
  // communicator's asynchronous error; throws after timeout_s (and aborts). `what` names the
  // exchange in the message.
  void wait(cudaStream_t stream, const char* what);

  // The orderly end (every rank): ncclCommFinalize, bounded by timeout_s, then ncclCommDestroy.
  void destroy();
  // The local end, never waiting for peers: ncclCommAbort. Safe to call in any state.
  void abort();

  void set_timeout(double seconds);
  double timeout() const { return timeout_s_; }
  NcclState state() const { return state_; }
  int device() const { return device_; }
  int world() const { return world_; }
  int rank() const { return rank_; }

 private:
  void require_ready(const char* what) const;
  // Polls until the communicator is no longer ncclInProgress (nonblocking init, group end,
  // finalize), bounded by timeout_s.
  void settle(const char* what);
  // Throws (after aborting) if the communicator reports an asynchronous error.
  void check_async(const char* what);
  [[noreturn]] void fail(NcclState state, const std::string& msg);
  std::string timeout_message(const char* what) const;

  int device_, world_, rank_;
  double timeout_s_;
  ncclComm_t comm_ = nullptr;
  cudaEvent_t done_ = nullptr;
  NcclState state_ = NcclState::kNew;
};

}  // namespace moe_ext::comm
