// Replica choice for expert replication (EP x DP): which copy of an expert each assignment uses.
// Torch-free launcher: raw pointers, int64 sizes, a cudaStream_t.
//
// The n-th assignment to expert e in (token, slot) order goes to replica (n + rank) mod
// replica_counts[e], whose physical slot is replica_slots[e, that replica]; unrouted slots (-1)
// stay -1, and so do ids outside [-1, num_experts) (the CPU op raises for them; here that check
// would need a host synchronisation). One block ranks the slots in turns (kernels/slot_rank.cuh),
// so a decode step's lookup is one launch instead of the ~20 small ops of the tensor version.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moe_ext::kernels {

constexpr int64_t kReplicaRouteMaxSlots = 2048;
constexpr int64_t kReplicaRouteMaxExperts = 10240;

// idx / phys: [num_slots] int32 or int64 (both the same type); replica_counts [num_experts] and
// replica_slots [num_experts, max_replicas] int64. num_slots <= kReplicaRouteMaxSlots and
// num_experts <= kReplicaRouteMaxExperts.
void route_to_replicas(const void* idx, bool idx_is_int64, int64_t num_slots, int64_t num_experts,
                       const int64_t* replica_counts, const int64_t* replica_slots, int64_t max_replicas,
                       int64_t rank, void* phys, cudaStream_t stream);

}  // namespace moe_ext::kernels
