// Replica choice in one block (declared in replicas.cuh).
#include "kernels/exception.cuh"
#include "kernels/replicas.cuh"
#include "kernels/slot_rank.cuh"

namespace moe_ext::kernels {
namespace {

constexpr int kThreads = 512;

template <typename IdxT>
__global__ void __launch_bounds__(kThreads)
    replica_kernel(const IdxT* __restrict__ idx, int64_t n, int64_t num_experts, const int64_t* __restrict__ counts,
                   const int64_t* __restrict__ slots, int64_t max_replicas, int64_t rank, IdxT* __restrict__ phys) {
  extern __shared__ int s_count[];  // [num_experts]: assignments ranked so far
  for (int64_t e = threadIdx.x; e < num_experts; e += kThreads) s_count[e] = 0;
  __syncthreads();
  for (int64_t base = 0; base < n; base += kThreads) {
    const int64_t s = base + threadIdx.x;
    const int64_t raw = s < n ? static_cast<int64_t>(idx[s]) : -1;
    const int key = (raw >= 0 && raw < num_experts) ? static_cast<int>(raw) : -1;
    const int r = rank_block_round<kThreads>(key, s_count);
    if (s < n) {
      int64_t out = -1;
      if (key >= 0) {
        const int64_t c = counts[key];
        out = c > 0 ? slots[key * max_replicas + (r + rank) % c] : -1;
      }
      phys[s] = static_cast<IdxT>(out);
    }
  }
}

}  // namespace

void route_to_replicas(const void* idx, bool idx_is_int64, int64_t num_slots, int64_t num_experts,
                       const int64_t* replica_counts, const int64_t* replica_slots, int64_t max_replicas,
                       int64_t rank, void* phys, cudaStream_t stream) {
  MOE_HOST_ASSERT(num_slots >= 0 && num_slots <= kReplicaRouteMaxSlots, "route_to_replicas: too many slots");
  MOE_HOST_ASSERT(num_experts >= 1 && num_experts <= kReplicaRouteMaxExperts, "route_to_replicas: bad num_experts");
  MOE_HOST_ASSERT(max_replicas >= 1 && rank >= 0 && rank < (int64_t{1} << 31),
                  "route_to_replicas: bad max_replicas or rank");
  if (num_slots == 0) return;
  const size_t smem = static_cast<size_t>(num_experts) * sizeof(int);
  if (idx_is_int64)
    replica_kernel<int64_t><<<1, kThreads, smem, stream>>>(static_cast<const int64_t*>(idx), num_slots, num_experts,
                                                           replica_counts, replica_slots, max_replicas, rank,
                                                           static_cast<int64_t*>(phys));
  else
    replica_kernel<int32_t><<<1, kThreads, smem, stream>>>(static_cast<const int32_t*>(idx), num_slots, num_experts,
                                                           replica_counts, replica_slots, max_replicas, rank,
                                                           static_cast<int32_t*>(phys));
  MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe_ext::kernels
