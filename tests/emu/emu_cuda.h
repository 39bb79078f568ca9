// A CPU emulation of the CUDA subset that moe_ext's SIMT kernels use (gating, permute /
// unpermute, the portable grouped GEMM, the ipc backend's kernels): it lets CI run those kernels,
// unchanged, on a machine without a GPU and compare them with the CPU ops. Not a simulator of the
// hardware: it checks the kernels' logic (indexing, the barriers every thread / lane must reach,
// independence from block and thread order), never their speed or memory-model behaviour.
//
// Each block runs as blockDim cooperative fibers on the calling host thread (an emulated rank);
// blocks run one after the other in an order shuffled per launch, and inside a block one ready
// fiber at a time, picked at random, runs until it blocks (emu_runtime.cpp). __syncthreads and
// every warp-synchronous intrinsic (__shfl*_sync, __ballot_sync, __match_any_sync,
// __reduce_*_sync, __syncwarp, ldmatrix, mma.sync) are true rendezvous: a barrier that not every
// live thread (or lane of the mask) reaches is reported as a deadlock instead of silently passing.
// __shared__ is `static thread_local`: valid because a host thread runs one block at a time.
// Launches are synchronous; streams are ignored. The inline PTX the kernels use is replaced by
// build.py with the functions below and in emu_mma.h.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

// ---- qualifiers ----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static thread_local  // per emulated rank: ranks run launches concurrently
#define __constant__ static
#define __managed__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __CUDA_ARCH__ EMU_CUDA_ARCH
#ifndef EMU_CUDA_ARCH
#define EMU_CUDA_ARCH 900
#endif

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) double2 {
  double x, y;
};
struct alignas(16) ulonglong2 {
  unsigned long long x, y;
};
struct alignas(16) longlong2 {
  long long x, y;
};

inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

// ---- runtime API subset --------------------------------------------------------------------------
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMultiProcessorCount = 16,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace emu {

struct Fault : std::runtime_error {
  using std::runtime_error::runtime_error;
};
[[noreturn]] void fail(const std::string& msg);

// Device properties the launchers read. Each configuration tests select is another device
// index, as the launchers cache properties per device.
extern int sm_count;
extern int smem_optin;
extern int device;

struct Dim {
  uint3 tid, bid, bdim, gdim;
};
extern thread_local Dim cur;  // the running thread's indices (each host thread runs its own launches)
void* dynamic_smem();

// Warp-synchronous exchange: every lane of the mask posts `bytes` bytes and gets the whole warp's
// posts back in `all` (indexed by lane); returns the mask of lanes that took part.
unsigned warp_exchange(unsigned mask, const void* mine, size_t bytes, unsigned char (*all)[16]);
void sync_block();
int lane_id();
void spin_pause();  // a spinning thread lets the other threads of its block and the other ranks run

void launch_impl(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

struct Cfg {
  dim3 grid, block;
  size_t smem;
  Cfg(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
};

template <typename K>
auto launch(K kernel, Cfg cfg) {
  return [kernel, cfg](auto&&... args) {
    // Arguments are copied, as a launch copies them to the device.
    auto bound = std::make_tuple(std::decay_t<decltype(args)>(args)...);
    launch_impl(cfg.grid, cfg.block, cfg.smem, [&] { std::apply([&](auto&... a) { kernel(a...); }, bound); });
  };
}

}  // namespace emu

#define threadIdx (::emu::cur.tid)
#define blockIdx (::emu::cur.bid)
#define blockDim (::emu::cur.bdim)
#define gridDim (::emu::cur.gdim)
#define warpSize 32

inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = emu::device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {  // (device_info.cuh's DeviceScope)
  emu::device = d;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? emu::sm_count : emu::smem_optin;
  return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int v) {
  return v <= emu::smem_optin ? cudaSuccess : cudaErrorInvalidValue;
}
template <typename K>
inline cudaError_t cudaFuncSetAttribute(K*, cudaFuncAttribute a, int v) {
  return cudaFuncSetAttribute(static_cast<const void*>(nullptr), a, v);
}
// Resident blocks per SM as an H100-like SM allows them: 2048 threads, 228 KiB of shared memory
// (1 KiB reserved per block), 32 blocks.
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int threads, size_t smem) {
  if (threads <= 0) return cudaErrorInvalidValue;
  int by_threads = 2048 / threads, by_smem = static_cast<int>((228 * 1024) / (smem + 1024));
  *n = std::max(0, std::min({by_threads, by_smem, 32}));
  if (smem > static_cast<size_t>(emu::smem_optin)) *n = 0;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
enum cudaMemcpyKind { cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                     cudaMemcpyDeviceToDevice, cudaMemcpyDefault };
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, int = 0, cudaStream_t = nullptr) {
  std::memmove(d, s, n);
  return cudaSuccess;
}

struct cudaIpcMemHandle_t {
  char reserved[64];
};
struct CUevent_st;
using cudaEvent_t = CUevent_st*;
constexpr unsigned cudaEventDisableTiming = 2;
// Launches are synchronous: an event is complete as soon as it is recorded. NOTE: this API has no
// call that waits for the device (cudaMemcpy, cudaStreamSynchronize, cudaEventSynchronize, ...):
// that the launchers build against it shows they never synchronise with the host.
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  *e = reinterpret_cast<cudaEvent_t>(1);
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t = nullptr) { return cudaSuccess; }
inline cudaError_t cudaEventDestroy(cudaEvent_t) { return cudaSuccess; }

namespace emu {
// The PTX the ep kernels use for cross-GPU flags and timeouts (substituted by build.py).
uint64_t global_ns();
// A flag read is where a kernel spins: the other threads of the block run meanwhile, as they
// would on the GPU (a spinning fiber that never yielded could wait for a flag that a fiber of its
// own block has yet to raise).
inline uint64_t load_acquire_sys(const uint64_t* p) {
  const uint64_t v = __atomic_load_n(p, __ATOMIC_ACQUIRE);
  spin_pause();
  return v;
}
inline void store_release_sys(uint64_t* p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
}  // namespace emu

#define MOE_DEVICE_ASSERT(cond) \
  do {                          \
    if (!(cond)) ::emu::fail(std::string("device assertion failed: ") + #cond + " (" + __FILE__ + ":" + std::to_string(__LINE__) + ")"); \
  } while (0)

// ---- device intrinsics ---------------------------------------------------------------------------
inline void __syncthreads() { emu::sync_block(); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() {}
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
[[noreturn]] inline void __trap() { emu::fail("__trap"); }

template <typename T>
inline T __ldg(const T* p) { return *p; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(v)); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}

template <typename To, typename From>
inline To emu_bits(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
}
inline unsigned __float_as_uint(float v) { return emu_bits<unsigned>(v); }
inline int __float_as_int(float v) { return emu_bits<int>(v); }
inline float __uint_as_float(unsigned v) { return emu_bits<float>(v); }
inline float __int_as_float(int v) { return emu_bits<float>(v); }
inline long long __double_as_longlong(double v) { return emu_bits<long long>(v); }
inline double __longlong_as_double(long long v) { return emu_bits<double>(v); }

// Correctly rounded arithmetic: plain IEEE operations (the build passes -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __drcp_rn(double a) { return 1.0 / a; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }

using std::max;
using std::min;
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }

// Atomics. Fibers of one launch never interleave inside an operation, but the emulated ranks of
// an ep test run in separate host threads and write each other's buffers: integer atomics are
// real ones; floating-point ones (never used across ranks) are plain.
template <typename T, typename U>
inline T atomicAdd(T* p, U v) {
  if constexpr (std::is_integral_v<T>) return __atomic_fetch_add(p, static_cast<T>(v), __ATOMIC_SEQ_CST);
  const T old = *p;
  *p = static_cast<T>(old + static_cast<T>(v));
  return old;
}
template <typename T, typename U>
inline T atomicSub(T* p, U v) { return __atomic_fetch_sub(p, static_cast<T>(v), __ATOMIC_SEQ_CST); }
template <typename T, typename U>
inline T atomicOr(T* p, U v) { return __atomic_fetch_or(p, static_cast<T>(v), __ATOMIC_SEQ_CST); }
template <typename T, typename U>
inline T atomicAnd(T* p, U v) { return __atomic_fetch_and(p, static_cast<T>(v), __ATOMIC_SEQ_CST); }
template <typename T, typename U>
inline T atomicMax(T* p, U v) {
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (static_cast<T>(v) > old && !__atomic_compare_exchange_n(p, &old, static_cast<T>(v), false, __ATOMIC_SEQ_CST,
                                                                 __ATOMIC_SEQ_CST)) {
  }
  return old;
}
template <typename T, typename U>
inline T atomicMin(T* p, U v) {
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (static_cast<T>(v) < old && !__atomic_compare_exchange_n(p, &old, static_cast<T>(v), false, __ATOMIC_SEQ_CST,
                                                                 __ATOMIC_SEQ_CST)) {
  }
  return old;
}
template <typename T, typename U>
inline T atomicExch(T* p, U v) { return __atomic_exchange_n(p, static_cast<T>(v), __ATOMIC_SEQ_CST); }
template <typename T, typename U, typename V>
inline T atomicCAS(T* p, U cmp, V v) {
  T expected = static_cast<T>(cmp);
  __atomic_compare_exchange_n(p, &expected, static_cast<T>(v), false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
}

// ---- warp-synchronous intrinsics -----------------------------------------------------------------
namespace emu {
template <typename T>
inline T warp_get(const unsigned char (*all)[16], int lane) {
  T v;
  std::memcpy(&v, all[lane], sizeof(T));
  return v;
}
template <typename T>
inline T shfl_from(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>);
  unsigned char all[32][16];
  const unsigned took = warp_exchange(mask, &v, sizeof(T), all);
  if (!(took >> src & 1u)) return v;  // reading a lane outside the mask: undefined on the GPU
  return warp_get<T>(all, src);
}
}  // namespace emu

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  unsigned char all[32][16];
  emu::warp_exchange(mask, nullptr, 0, all);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = emu::lane_id();
  return emu::shfl_from(mask, v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
  const int lane = emu::lane_id();
  int src = lane ^ m;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return emu::shfl_from(mask, v, src);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
  const int lane = emu::lane_id();
  const int src = (lane & (width - 1)) >= static_cast<int>(d) ? lane - static_cast<int>(d) : lane;
  return emu::shfl_from(mask, v, src);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
  const int lane = emu::lane_id();
  const int src = (lane & (width - 1)) + static_cast<int>(d) < width ? lane + static_cast<int>(d) : lane;
  return emu::shfl_from(mask, v, src);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  unsigned char all[32][16];
  const int p = pred != 0;
  const unsigned took = emu::warp_exchange(mask, &p, sizeof(p), all);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if ((took >> l & 1u) && emu::warp_get<int>(all, l)) r |= 1u << l;
  return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  unsigned char all[32][16];
  const int p = pred != 0;
  const unsigned took = emu::warp_exchange(mask, &p, sizeof(p), all);
  for (int l = 0; l < 32; ++l)
    if ((took >> l & 1u) && !emu::warp_get<int>(all, l)) return 0;
  return 1;
}
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T v) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8);
  unsigned char all[32][16];
  const unsigned took = emu::warp_exchange(mask, &v, sizeof(T), all);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if ((took >> l & 1u) && std::memcmp(all[l], &v, sizeof(T)) == 0) r |= 1u << l;
  return r;
}
#define EMU_WARP_REDUCE(name, T, op)                                        \
  inline T name(unsigned mask, T v) {                                       \
    unsigned char all[32][16];                                              \
    const unsigned took = emu::warp_exchange(mask, &v, sizeof(T), all);     \
    bool first = true;                                                      \
    T r{};                                                                  \
    for (int l = 0; l < 32; ++l) {                                          \
      if (!(took >> l & 1u)) continue;                                      \
      const T x = emu::warp_get<T>(all, l);                                 \
      r = first ? x : op;                                                   \
      first = false;                                                        \
    }                                                                       \
    return r;                                                               \
  }
EMU_WARP_REDUCE(__reduce_max_sync, unsigned, (x > r ? x : r))
EMU_WARP_REDUCE(__reduce_max_sync, int, (x > r ? x : r))
EMU_WARP_REDUCE(__reduce_min_sync, unsigned, (x < r ? x : r))
EMU_WARP_REDUCE(__reduce_min_sync, int, (x < r ? x : r))
EMU_WARP_REDUCE(__reduce_add_sync, unsigned, (r + x))
EMU_WARP_REDUCE(__reduce_add_sync, int, (r + x))
EMU_WARP_REDUCE(__reduce_or_sync, unsigned, (r | x))
EMU_WARP_REDUCE(__reduce_and_sync, unsigned, (r & x))
#undef EMU_WARP_REDUCE
