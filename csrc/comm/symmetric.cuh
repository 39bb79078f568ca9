// The symmetric buffer of the ipc backend: one device allocation per rank, of the same layout on
// every rank (kernels/ep.cuh), opened by every peer through CUDA IPC. Torch-free: the caller
// moves the 64-byte handles between ranks (the Python package over the user's ProcessGroup, the
// C++ benchmark over shared memory) and calls open().
//
//   SymmetricBuffer buf(device, world, rank, sizes);   // allocates, zeroes the flags
//   auto mine = buf.handle();                          // to every peer
//   buf.open(all_handles);                             // world handles, this rank's included
// The sizes must be the same on every rank (peers write at offsets of their own layout): the
// caller exchanges and compares them with the handles (moe_ext/_ipc.py does).
//   kernels::EpParams p = buf.params();                // the communicator fields, ready to launch
//   ... launches ...; buf.error() after a synchronisation
//   buf.close();                                       // also in the destructor
#pragma once

#include "kernels/ep.cuh"

#include <array>
#include <cstdint>
#include <vector>

namespace moe_ext::comm {

using IpcHandle = std::array<char, sizeof(cudaIpcMemHandle_t)>;

class SymmetricBuffer {
 public:
  SymmetricBuffer(int device, int world, int rank, const kernels::EpSizes& sizes);
  ~SymmetricBuffer();
  SymmetricBuffer(const SymmetricBuffer&) = delete;
  SymmetricBuffer& operator=(const SymmetricBuffer&) = delete;

  IpcHandle handle() const;
  // handles[r] is rank r's handle (this rank's own is not opened, its pointer is used).
  void open(const std::vector<IpcHandle>& handles);
  // Unmaps the peers' buffers (after this rank's work on the device is done). CUDA requires
  // every importer to unmap before the exporter frees: close_peers() on every rank, a barrier,
  // then close(). close() alone (destructor, process exit) does both without the barrier.
  void close_peers();
  // Waits for this rank's work on the device, closes the peers' mappings, frees everything.
  void close();
  bool is_open() const { return opened_; }

  kernels::EpParams params() const;  // communicator fields of EpParams
  const kernels::EpLayout& layout() const { return layout_; }
  // The first error recorded by the kernels (code kEpOk if none). Read after synchronising.
  kernels::EpError error() const;
  // The exact layout's row count written by ep_exchange_counts (host-mapped), after synchronising.
  int64_t recv_total() const;
  int64_t* recv_total_device() const { return host_words_dev_; }
  size_t bytes() const;  // device bytes held (buffer + control + peer table)
  int device() const { return device_; }

 private:
  int device_, world_, rank_;
  kernels::EpLayout layout_;
  char* local_ = nullptr;
  std::vector<char*> peers_;          // host copy
  char** peers_dev_ = nullptr;        // device copy
  kernels::EpControl* control_ = nullptr;
  void* host_page_ = nullptr;         // pinned, mapped: EpError then recv_total
  kernels::EpError* error_host_ = nullptr;
  kernels::EpError* error_dev_ = nullptr;
  int64_t* host_words_ = nullptr;
  int64_t* host_words_dev_ = nullptr;
  bool opened_ = false;
};

}  // namespace moe_ext::comm
