// comm::NcclComm (nccl_comm.cuh): host code only, in a .cu so that setup.py and CMake compile it
// with the CUDA build (csrc/comm/*.cu) and link it against the NCCL that torch loads.
#include "comm/nccl_comm.cuh"
#include "kernels/device_info.cuh"
#include "kernels/exception.cuh"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

namespace moe_ext::comm {
namespace {

using kernels::DeviceScope;

using Clock = std::chrono::steady_clock;

std::string describe(ncclResult_t r, ncclComm_t comm) {
  std::string s = ncclGetErrorString(r);
  const char* last = ncclGetLastError(comm);  // NOTE: comm may be null: then the thread's last error
  if (last != nullptr && *last != '\0') s += std::string(" (") + last + ")";
  return s;
}

// The pause between two polls: yields for the first ~2000 polls (an exchange of a few KB
// finishes in tens of microseconds), then sleeps 100 us (a long wait costs no CPU core).
void pause(int64_t polls) {
  if (polls < 2000) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

std::string seconds_text(double seconds) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", seconds);
  return buf;
}

Clock::time_point deadline_after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

}  // namespace

NcclUniqueId NcclComm::unique_id() {
  ncclUniqueId id;
  const ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) throw Error(__FILE__, __LINE__, "ncclGetUniqueId: " + describe(r, nullptr));
  NcclUniqueId out;
  static_assert(sizeof(id.internal) == std::tuple_size<NcclUniqueId>::value, "ncclUniqueId size");
  std::memcpy(out.data(), id.internal, out.size());
  return out;
}

int NcclComm::version() {
  int v = 0;
  const ncclResult_t r = ncclGetVersion(&v);
  if (r != ncclSuccess) throw Error(__FILE__, __LINE__, "ncclGetVersion: " + describe(r, nullptr));
  return v;
}

NcclComm::NcclComm(int device, int world, int rank, double timeout_s)
    : device_(device), world_(world), rank_(rank), timeout_s_(timeout_s) {
  MOE_HOST_ASSERT(world >= 1, "NcclComm: world size must be >= 1, got " + std::to_string(world));
  MOE_HOST_ASSERT(rank >= 0 && rank < world,
                  "NcclComm: rank " + std::to_string(rank) + " is outside [0, " + std::to_string(world) + ")");
  MOE_HOST_ASSERT(device >= 0, "NcclComm: device must be >= 0, got " + std::to_string(device));
  set_timeout(timeout_s);
}

NcclComm::~NcclComm() {
  abort();
  if (done_ != nullptr) {
    int previous = 0;
    if (cudaGetDevice(&previous) == cudaSuccess) {  // NOTE: no throwing here, and the driver may be gone
      cudaSetDevice(device_);
      cudaEventDestroy(done_);
      cudaSetDevice(previous);
    }
    done_ = nullptr;
  }
}

void NcclComm::set_timeout(double seconds) {
  MOE_HOST_ASSERT(seconds > 0, "NcclComm: timeout must be > 0 seconds, got " + seconds_text(seconds));
  timeout_s_ = seconds;
}

void NcclComm::init(const NcclUniqueId& id) {
  MOE_HOST_ASSERT(state_ == NcclState::kNew, "NcclComm: init() may be called once, on a new communicator");
  DeviceScope scope(device_);
  if (done_ == nullptr) MOE_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  ncclUniqueId uid;
  std::memcpy(uid.internal, id.data(), id.size());
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // NOTE: every wait is then ours (settle / wait), bounded by timeout_s
  const ncclResult_t r = ncclCommInitRankConfig(&comm_, world_, uid, rank_, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    const std::string msg = describe(r, comm_);
    abort();
    state_ = NcclState::kFailed;
    throw Error(__FILE__, __LINE__, "ncclCommInitRankConfig (group rank " + std::to_string(rank_) + " of " +
                                        std::to_string(world_) + " on cuda:" + std::to_string(device_) + "): " + msg);
  }
  state_ = NcclState::kReady;
  settle("joining the communicator");
}

void NcclComm::require_ready(const char* what) const {
  if (state_ == NcclState::kReady) return;
  const char* why = state_ == NcclState::kNew        ? "was never initialised (init())"
                    : state_ == NcclState::kClosed   ? "was closed"
                    : state_ == NcclState::kTimedOut ? "was aborted after an earlier call timed out"
                                                     : "was aborted after an earlier NCCL error";
  throw Error(__FILE__, __LINE__, std::string("NcclComm: ") + what + ": the communicator " + why);
}

std::string NcclComm::timeout_message(const char* what) const {
  return std::string("NCCL ") + what + " did not complete within " + seconds_text(timeout_s_) + " s on group rank " +
         std::to_string(rank_) + " of " + std::to_string(world_) +
         ": one or more of the other ranks did not make the matching call, or died (NCCL itself cannot tell which); "
         "the communicator was aborted";
}

void NcclComm::fail(NcclState state, const std::string& msg) {
  abort();
  state_ = state;
  throw Error(__FILE__, __LINE__, msg);
}

void NcclComm::check_async(const char* what) {
  ncclResult_t state = ncclSuccess;
  const ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
  if (r != ncclSuccess) fail(NcclState::kFailed, std::string("NCCL ") + what + ": ncclCommGetAsyncError: " +
                                                     describe(r, comm_));
  if (state != ncclSuccess && state != ncclInProgress)
    fail(NcclState::kFailed, std::string("NCCL ") + what + " failed on group rank " + std::to_string(rank_) + " of " +
                                 std::to_string(world_) + ": " + describe(state, comm_));
}

void NcclComm::settle(const char* what) {
  const Clock::time_point deadline = deadline_after(timeout_s_);
  for (int64_t polls = 0;; ++polls) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
    if (r != ncclSuccess) fail(NcclState::kFailed, std::string("NCCL ") + what + ": ncclCommGetAsyncError: " +
                                                       describe(r, comm_));
    if (state == ncclSuccess) return;
    if (state != ncclInProgress)
      fail(NcclState::kFailed, std::string("NCCL ") + what + " failed on group rank " + std::to_string(rank_) + " of " +
                                   std::to_string(world_) + ": " + describe(state, comm_));
    if (Clock::now() > deadline) fail(NcclState::kTimedOut, timeout_message(what));
    pause(polls);
  }
}

void NcclComm::alltoallv(const void* send, const int64_t* send_bytes, const int64_t* send_offsets, void* recv,
                         const int64_t* recv_bytes, const int64_t* recv_offsets, cudaStream_t stream) {
  require_ready("alltoallv");
  bool any = false;
  for (int p = 0; p < world_; ++p) {
    MOE_HOST_ASSERT(send_bytes[p] >= 0 && send_offsets[p] >= 0 && recv_bytes[p] >= 0 && recv_offsets[p] >= 0,
                    "NcclComm::alltoallv: negative count or offset for peer " + std::to_string(p));
    any = any || send_bytes[p] > 0 || recv_bytes[p] > 0;
  }
  if (!any) return;
  DeviceScope scope(device_);
  // NOTE: bytes as ncclChar: both sides of a send/recv pair must give the same datatype, and the
  // only thing both sides know is the byte count; NCCL's p2p path moves count * type size bytes
  // whatever the type, so a wider type would gain nothing. Counts are size_t: 64-bit.
  const char* send_base = static_cast<const char*>(send);
  char* recv_base = static_cast<char*>(recv);
  ncclResult_t r = ncclGroupStart();
  if (r != ncclSuccess) fail(NcclState::kFailed, "ncclGroupStart: " + describe(r, comm_));
  for (int p = 0; p < world_ && (r == ncclSuccess || r == ncclInProgress); ++p) {
    if (send_bytes[p] > 0)
      r = ncclSend(send_base + send_offsets[p], static_cast<size_t>(send_bytes[p]), ncclChar, p, comm_, stream);
    if ((r == ncclSuccess || r == ncclInProgress) && recv_bytes[p] > 0)
      r = ncclRecv(recv_base + recv_offsets[p], static_cast<size_t>(recv_bytes[p]), ncclChar, p, comm_, stream);
  }
  const ncclResult_t end = ncclGroupEnd();  // NOTE: always closes the group, even after a failed send/recv
  if (r != ncclSuccess && r != ncclInProgress)
    fail(NcclState::kFailed, "NCCL send/recv in alltoallv on group rank " + std::to_string(rank_) + ": " +
                                 describe(r, comm_));
  if (end == ncclInProgress) {
    settle("alltoallv (enqueue)");
  } else if (end != ncclSuccess) {
    fail(NcclState::kFailed, "ncclGroupEnd in alltoallv on group rank " + std::to_string(rank_) + ": " +
                                 describe(end, comm_));
  }
}

void NcclComm::wait(cudaStream_t stream, const char* what) {
  require_ready(what);
  DeviceScope scope(device_);
  MOE_CUDA_CHECK(cudaEventRecord(done_, stream));
  const Clock::time_point deadline = deadline_after(timeout_s_);
  for (int64_t polls = 0;; ++polls) {
    const cudaError_t q = cudaEventQuery(done_);
    if (q == cudaSuccess) return;
    if (q != cudaErrorNotReady) {
      cudaGetLastError();  // NOTE: clears a non-sticky error; a sticky one stays with the context
      fail(NcclState::kFailed, std::string("CUDA error while waiting for ") + what + ": " + cudaGetErrorString(q));
    }
    check_async(what);
    if (Clock::now() > deadline) fail(NcclState::kTimedOut, timeout_message(what));
    pause(polls);
  }
}

void NcclComm::destroy() {
  if (comm_ == nullptr) {
    if (state_ == NcclState::kNew || state_ == NcclState::kReady) state_ = NcclState::kClosed;
    return;
  }
  DeviceScope scope(device_);
  const ncclResult_t r = ncclCommFinalize(comm_);
  if (r == ncclInProgress) {
    settle("finalize");
  } else if (r != ncclSuccess) {
    fail(NcclState::kFailed, "ncclCommFinalize: " + describe(r, comm_));
  }
  const ncclResult_t d = ncclCommDestroy(comm_);
  comm_ = nullptr;
  state_ = NcclState::kClosed;
  if (d != ncclSuccess && d != ncclInProgress)
    throw Error(__FILE__, __LINE__, "ncclCommDestroy: " + std::string(ncclGetErrorString(d)));
}

void NcclComm::abort() {
  if (comm_ != nullptr) {
    int previous = 0;
    const bool have_device = cudaGetDevice(&previous) == cudaSuccess;
    if (have_device) cudaSetDevice(device_);
    ncclCommAbort(comm_);  // NOTE: local: frees our side, stops our kernels, never waits for peers
    if (have_device) cudaSetDevice(previous);
    comm_ = nullptr;
  }
  if (state_ == NcclState::kNew || state_ == NcclState::kReady) state_ = NcclState::kClosed;
}

}  // namespace moe_ext::comm
