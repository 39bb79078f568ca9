// Errors for the torch-free kernel library: host checks throw moe_ext::Error with file:line;
// device checks print and trap. Every launch is followed by MOE_CUDA_CHECK(cudaGetLastError()).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdio>
#include <stdexcept>
#include <string>

namespace moe_ext {

class Error : public std::runtime_error {
 public:
  Error(const char* file, int line, const std::string& msg)
      : std::runtime_error(std::string("moe_ext: ") + msg + " (" + file + ":" + std::to_string(line) + ")") {}
};

}  // namespace moe_ext

#define MOE_HOST_ASSERT(cond, msg)                                                       \
  do {                                                                                   \
    if (!(cond)) throw ::moe_ext::Error(__FILE__, __LINE__, std::string(msg) + " [" #cond "]"); \
  } while (0)

#define MOE_CUDA_CHECK(expr)                                                                             \
  do {                                                                                                   \
    const cudaError_t moe_err_ = (expr);                                                                 \
    if (moe_err_ != cudaSuccess)                                                                         \
      throw ::moe_ext::Error(__FILE__, __LINE__, std::string(#expr) + ": " + cudaGetErrorString(moe_err_)); \
  } while (0)

#ifdef __CUDACC__
#define MOE_DEVICE_ASSERT(cond)                                                                      \
  do {                                                                                               \
    if (!(cond)) {                                                                                   \
      printf("moe_ext device assertion failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__);           \
      asm("trap;");                                                                                  \
    }                                                                                                \
  } while (0)
#endif
