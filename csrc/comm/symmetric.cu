// SymmetricBuffer: allocation, CUDA IPC export/import, teardown. See symmetric.cuh.
#include "comm/symmetric.cuh"
#include "kernels/device_info.cuh"
#include "kernels/exception.cuh"

#include <atomic>
#include <cstring>

namespace moe_ext::comm {

using kernels::DeviceScope;

SymmetricBuffer::SymmetricBuffer(int device, int world, int rank, const kernels::EpSizes& sizes)
    : device_(device), world_(world), rank_(rank), layout_(kernels::ep_layout(sizes)) {
  MOE_HOST_ASSERT(world == sizes.world && rank >= 0 && rank < world, "SymmetricBuffer: rank/world mismatch");
  DeviceScope scope(device);
  try {
    MOE_CUDA_CHECK(cudaMalloc(&local_, layout_.total));
    // NOTE: only the flags and counts must start at zero; the rest is written before it is read.
    MOE_CUDA_CHECK(cudaMemset(local_, 0, layout_.meta));
    MOE_CUDA_CHECK(cudaMalloc(&control_, sizeof(kernels::EpControl)));
    MOE_CUDA_CHECK(cudaMemset(control_, 0, sizeof(kernels::EpControl)));
    MOE_CUDA_CHECK(cudaMalloc(&peers_dev_, sizeof(char*) * world));
    MOE_CUDA_CHECK(cudaHostAlloc(&host_page_, sizeof(kernels::EpError) + 2 * sizeof(int64_t), cudaHostAllocMapped));
    std::memset(host_page_, 0, sizeof(kernels::EpError) + 2 * sizeof(int64_t));
    void* dev_page = nullptr;
    MOE_CUDA_CHECK(cudaHostGetDevicePointer(&dev_page, host_page_, 0));
    error_host_ = static_cast<kernels::EpError*>(host_page_);
    error_dev_ = static_cast<kernels::EpError*>(dev_page);
    host_words_ = reinterpret_cast<int64_t*>(error_host_ + 1);
    host_words_dev_ = reinterpret_cast<int64_t*>(error_dev_ + 1);
    MOE_CUDA_CHECK(cudaDeviceSynchronize());
  } catch (...) {
    close();
    throw;
  }
  peers_.assign(world, nullptr);
  peers_[rank] = local_;
}

SymmetricBuffer::~SymmetricBuffer() {
  try {
    close();
  } catch (...) {  // NOTE: a destructor must not throw; close() already released what it could
  }
}

IpcHandle SymmetricBuffer::handle() const {
  MOE_HOST_ASSERT(local_ != nullptr, "SymmetricBuffer: closed");
  cudaIpcMemHandle_t h;
  DeviceScope scope(device_);
  MOE_CUDA_CHECK(cudaIpcGetMemHandle(&h, local_));
  IpcHandle out;
  std::memcpy(out.data(), &h, sizeof(h));
  return out;
}

void SymmetricBuffer::open(const std::vector<IpcHandle>& handles) {
  MOE_HOST_ASSERT(local_ != nullptr && !opened_, "SymmetricBuffer: open() needs a fresh, unopened buffer");
  MOE_HOST_ASSERT(static_cast<int>(handles.size()) == world_, "SymmetricBuffer: one handle per rank expected");
  DeviceScope scope(device_);
  for (int r = 0; r < world_; ++r) {
    if (r == rank_) continue;
    cudaIpcMemHandle_t h;
    std::memcpy(&h, handles[r].data(), sizeof(h));
    void* ptr = nullptr;
    const cudaError_t err = cudaIpcOpenMemHandle(&ptr, h, cudaIpcMemLazyEnablePeerAccess);
    if (err != cudaSuccess) {
      cudaGetLastError();
      for (int q = 0; q < r; ++q)
        if (q != rank_ && peers_[q] != nullptr) cudaIpcCloseMemHandle(peers_[q]), peers_[q] = nullptr;
      throw Error(__FILE__, __LINE__,
                  "ipc backend: cannot open the buffer of rank " + std::to_string(r) + " on device " +
                      std::to_string(device_) + " (cudaIpcOpenMemHandle: " + cudaGetErrorString(err) +
                      "); the ranks must share a node and their GPUs need peer access");
    }
    peers_[r] = static_cast<char*>(ptr);
  }
  MOE_CUDA_CHECK(cudaMemcpy(peers_dev_, peers_.data(), sizeof(char*) * world_, cudaMemcpyHostToDevice));
  opened_ = true;
}

void SymmetricBuffer::close_peers() {
  if (peers_.empty()) return;
  DeviceScope scope(device_);
  cudaDeviceSynchronize();  // NOTE: nothing of ours may still run against the mappings
  for (int r = 0; r < static_cast<int>(peers_.size()); ++r)
    if (r != rank_ && peers_[r] != nullptr) cudaIpcCloseMemHandle(peers_[r]);
  peers_.clear();
  opened_ = false;
  cudaGetLastError();
}

void SymmetricBuffer::close() {
  if (local_ == nullptr && control_ == nullptr && host_page_ == nullptr) return;
  close_peers();
  DeviceScope scope(device_);
  cudaDeviceSynchronize();
  if (peers_dev_) cudaFree(peers_dev_);
  if (control_) cudaFree(control_);
  if (local_) cudaFree(local_);
  if (host_page_) cudaFreeHost(host_page_);
  peers_dev_ = nullptr;
  control_ = nullptr;
  local_ = nullptr;
  host_page_ = nullptr;
  error_host_ = error_dev_ = nullptr;
  host_words_ = host_words_dev_ = nullptr;
  opened_ = false;
  cudaGetLastError();
}

kernels::EpParams SymmetricBuffer::params() const {
  MOE_HOST_ASSERT(opened_, "SymmetricBuffer: open() it first (or it was closed)");
  kernels::EpParams p;
  p.world = world_;
  p.rank = rank_;
  p.layout = layout_;
  p.local = local_;
  p.peers = peers_dev_;
  p.control = control_;
  p.error = error_dev_;
  p.recv_total_host = host_words_dev_;
  return p;
}

kernels::EpError SymmetricBuffer::error() const {
  kernels::EpError e{};
  if (error_host_ == nullptr) return e;
  // NOTE: the device writes the fields, fences, then the code: read the code first, the rest after
  // it (a plain memcpy may read the fields before a code that is being published).
  const int code = *reinterpret_cast<volatile const int32_t*>(&error_host_->code);
  if (code == 0) return e;
  std::atomic_thread_fence(std::memory_order_acquire);
  std::memcpy(&e, const_cast<const kernels::EpError*>(error_host_), sizeof(e));
  e.code = code;
  return e;
}

int64_t SymmetricBuffer::recv_total() const {
  return host_words_ != nullptr ? *reinterpret_cast<volatile int64_t*>(host_words_) : 0;
}

size_t SymmetricBuffer::bytes() const {
  if (local_ == nullptr) return 0;
  return layout_.total + sizeof(kernels::EpControl) + sizeof(char*) * world_;
}

}  // namespace moe_ext::comm
