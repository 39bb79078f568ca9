// Every launcher of the torch-free kernel library. Launchers take raw pointers, sizes and a
// cudaStream_t, never torch types, so the C++ benchmarks and tests link them without libtorch.
// Each stage declares its launchers in its own header, included here.
#pragma once

#include "kernels/exception.cuh"
#include "kernels/permute.cuh"
#include "kernels/replicas.cuh"
#include "kernels/gating.cuh"
#include "kernels/grouped_gemm.cuh"
#include "kernels/swiglu.cuh"
