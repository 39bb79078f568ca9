// torch.classes.moe_ext.NcclComm: the nccl backend's communicator for one (group, device), a thin
// adapter over comm::NcclComm (comm/nccl_comm.cuh). moe_ext/_nccl.py moves the unique id through
// the user's ProcessGroup and runs the dispatch/combine protocol of moe_ext/dispatch.py over
// alltoallv().
//
//   c = torch.classes.moe_ext.NcclComm(device, world, rank, timeout_s)
//   uid = c.unique_id()                  # rank 0: uint8 [128] CPU tensor, sent to every rank
//   c.init(uid)                          # every rank; returns once all joined (bounded)
//   c.alltoallv(send, recv, send_splits, recv_splits)   # rows per peer; synchronous, bounded
//   c.close()                            # every rank; c.abort() is the local way out
//
// A TorchScript custom class rather than ops with an int handle: the communicator is state, not
// a graph op (no fake kernel or autograd to give it), and the class ties its lifetime to the
// Python object (the destructor aborts a communicator that was never closed).
//
// Compiled in every build: without CUDA (MOE_EXT_WITH_CUDA undefined, the CPU-only extension)
// this file registers nothing, and moe_ext/_nccl.py says the build has no nccl backend.
#ifdef MOE_EXT_WITH_CUDA

#include "comm/nccl_comm.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

namespace moe_ext {
namespace {

using Tensor = at::Tensor;

constexpr const char* kName = "moe_ext nccl backend";

class NcclComm : public torch::CustomClassHolder {
 public:
  NcclComm(int64_t device, int64_t world, int64_t rank, double timeout_s) : device_(device) {
    const int64_t num_devices = c10::cuda::device_count();
    TORCH_CHECK(device >= 0 && device < num_devices, kName, ": device must be a CUDA device index in [0, ",
                num_devices, "), got ", device);
    TORCH_CHECK(world >= 1, kName, ": world must be >= 1, got ", world);
    TORCH_CHECK(rank >= 0 && rank < world, kName, ": rank must be in [0, world=", world, "), got ", rank);
    TORCH_CHECK(timeout_s > 0, kName, ": timeout must be > 0 seconds, got ", timeout_s);
    comm_ = std::make_unique<comm::NcclComm>(static_cast<int>(device), static_cast<int>(world),
                                             static_cast<int>(rank), timeout_s);
  }

  // A fresh ncclUniqueId as a uint8 [128] CPU tensor (made on one rank, given to every rank's init).
  Tensor unique_id() {
    comm::NcclUniqueId id;
    try {
      id = comm::NcclComm::unique_id();
    } catch (const std::exception& e) {
      TORCH_CHECK(false, kName, ": ", e.what());
    }
    Tensor out = at::empty({static_cast<int64_t>(id.size())}, at::kByte);
    std::memcpy(out.data_ptr(), id.data(), id.size());
    return out;
  }

  void init(const Tensor& unique_id) {
    const Tensor id = unique_id.to(at::kCPU).contiguous();
    TORCH_CHECK(id.scalar_type() == at::kByte && id.dim() == 1 && id.numel() == NCCL_UNIQUE_ID_BYTES, kName,
                ": unique_id must be a uint8 [", NCCL_UNIQUE_ID_BYTES, "] tensor, got ", id.scalar_type(), " ",
                id.sizes());
    comm::NcclUniqueId uid;
    std::memcpy(uid.data(), id.data_ptr(), uid.size());
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    try {
      comm().init(uid);
    } catch (const std::exception& e) {
      TORCH_CHECK(false, kName, ": ", e.what());
    }
  }

  // recv[rows from peer p] = what peer p sends to this rank; send[rows to peer p] to peer p.
  // send [N_send, ...] and recv [N_recv, ...]: contiguous, one dtype, the same trailing shape, on
  // the communicator's device; splits: rows per peer (world entries each). Runs on the current
  // stream and returns once the exchange completed (bounded by the timeout).
  void alltoallv(const Tensor& send, const Tensor& recv, std::vector<int64_t> send_splits,
                 std::vector<int64_t> recv_splits) {
    const int64_t world = comm().world();
    const c10::Device dev(c10::kCUDA, static_cast<c10::DeviceIndex>(device_));
    TORCH_CHECK(send.device() == dev, kName, ": send must be on ", dev, ", got ", send.device());
    TORCH_CHECK(recv.device() == dev, kName, ": recv must be on ", dev, ", got ", recv.device());
    TORCH_CHECK(send.dim() >= 1 && recv.dim() == send.dim(), kName, ": send and recv must have the same number (>= 1) "
                "of dimensions, got ", send.sizes(), " and ", recv.sizes());
    TORCH_CHECK(send.scalar_type() == recv.scalar_type(), kName, ": recv must have the dtype of send (",
                send.scalar_type(), "), got ", recv.scalar_type());
    TORCH_CHECK(send.sizes().slice(1) == recv.sizes().slice(1), kName, ": send ", send.sizes(), " and recv ",
                recv.sizes(), " must have the same row shape");
    TORCH_CHECK(send.is_contiguous() && recv.is_contiguous(), kName, ": send and recv must be contiguous");
    TORCH_CHECK(static_cast<int64_t>(send_splits.size()) == world, kName, ": send_splits must have world=", world,
                " entries, got ", send_splits.size());
    TORCH_CHECK(static_cast<int64_t>(recv_splits.size()) == world, kName, ": recv_splits must have world=", world,
                " entries, got ", recv_splits.size());
    int64_t row_bytes = static_cast<int64_t>(send.element_size());
    for (int64_t d = 1; d < send.dim(); ++d) row_bytes *= send.size(d);
    std::vector<int64_t> send_bytes(world), send_offsets(world), recv_bytes(world), recv_offsets(world);
    int64_t send_rows = 0, recv_rows = 0;
    for (int64_t p = 0; p < world; ++p) {
      TORCH_CHECK(send_splits[p] >= 0 && recv_splits[p] >= 0, kName, ": splits must be >= 0, got ",
                  send_splits[p], " and ", recv_splits[p], " for peer ", p);
      send_offsets[p] = send_rows * row_bytes;  // NOTE: 64-bit byte offsets and counts throughout
      recv_offsets[p] = recv_rows * row_bytes;
      send_bytes[p] = send_splits[p] * row_bytes;
      recv_bytes[p] = recv_splits[p] * row_bytes;
      send_rows += send_splits[p];
      recv_rows += recv_splits[p];
    }
    TORCH_CHECK(send_rows == send.size(0), kName, ": send_splits sum to ", send_rows, " rows, send has ",
                send.size(0));
    TORCH_CHECK(recv_rows == recv.size(0), kName, ": recv_splits sum to ", recv_rows, " rows, recv has ",
                recv.size(0));
    c10::cuda::CUDAGuard guard(dev);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
    try {
      comm().alltoallv(send.data_ptr(), send_bytes.data(), send_offsets.data(), recv.data_ptr(), recv_bytes.data(),
                       recv_offsets.data(), stream);
      comm().wait(stream, "alltoallv");
    } catch (const std::exception& e) {
      TORCH_CHECK(false, kName, ": ", e.what());
    }
  }

  void set_timeout(double seconds) {
    TORCH_CHECK(seconds > 0, kName, ": timeout must be > 0 seconds, got ", seconds);
    comm().set_timeout(seconds);
  }

  double timeout() { return comm().timeout(); }

  // 0 new, 1 ready, 2 closed, 3 aborted after a timeout, 4 aborted after an NCCL or CUDA error.
  int64_t state() { return static_cast<int64_t>(comm().state()); }

  int64_t version() {
    try {
      return comm::NcclComm::version();
    } catch (const std::exception& e) {
      TORCH_CHECK(false, kName, ": ", e.what());
    }
  }

  // The orderly end on every rank (bounded by the timeout; aborts when it expires).
  void close() {
    try {
      comm().destroy();
    } catch (const std::exception& e) {
      TORCH_CHECK(false, kName, ": closing the communicator: ", e.what());
    }
  }

  void abort() { comm().abort(); }

 private:
  comm::NcclComm& comm() { return *comm_; }

  int64_t device_;
  std::unique_ptr<comm::NcclComm> comm_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_ext, m) {
  m.class_<NcclComm>("NcclComm")
      .def(torch::init<int64_t, int64_t, int64_t, double>())
      .def("unique_id", &NcclComm::unique_id)
      .def("init", &NcclComm::init)
      .def("alltoallv", &NcclComm::alltoallv)
      .def("set_timeout", &NcclComm::set_timeout)
      .def("timeout", &NcclComm::timeout)
      .def("state", &NcclComm::state)
      .def("version", &NcclComm::version)
      .def("close", &NcclComm::close)
      .def("abort", &NcclComm::abort);
}

}  // namespace moe_ext

#endif  // MOE_EXT_WITH_CUDA
