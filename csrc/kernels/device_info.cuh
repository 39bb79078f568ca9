// Host-side facts about the current device that launch configurations read: cached per device,
// so a launch does not pay a driver query each time.
#pragma once

#include "kernels/exception.cuh"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>

namespace moe_ext::kernels {

inline int current_device() {
  int device = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

inline int device_sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int sms = 0;
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  sms = std::max(sms, 1);
  if (device >= 0 && device < kMaxDevices) cache[device].store(sms, std::memory_order_relaxed);
  return sms;
}

inline int sm_count() { return device_sm_count(current_device()); }

// Makes `device` current for a scope and restores the caller's device at its end.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    MOE_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) MOE_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceScope() { cudaSetDevice(previous_); }  // NOTE: no throwing from a destructor
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace moe_ext::kernels
