// The fiber scheduler behind tests/emu/emu_cuda.h (see there). x86-64 Linux only: a fiber switch
// saves the callee-saved registers and swaps stacks (a few instructions, no system call), since a
// kernel's warp intrinsics switch fibers thousands of times per block.
#include "emu_cuda.h"

#include <sched.h>
#include <unistd.h>
#include <sys/mman.h>

#include <chrono>

#include <algorithm>
#include <cstdlib>
#include <random>
#include <vector>

extern "C" void emu_switch(void** save_sp, void* load_sp);

// AddressSanitizer (build.py with MOE_EXT_EMU_ASAN=1) must be told of every stack switch.
#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN_START(save, bottom, size) __sanitizer_start_switch_fiber(save, bottom, size)
#define EMU_ASAN_FINISH(save, bottom, size) __sanitizer_finish_switch_fiber(save, bottom, size)
#else
#define EMU_ASAN_START(save, bottom, size) ((void)0)
#define EMU_ASAN_FINISH(save, bottom, size) ((void)0)
#endif
asm(R"(
  .text
  .globl emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
)");

namespace emu {

int sm_count = 132;
int smem_optin = 227 * 1024;
int device = 0;
thread_local Dim cur;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
enum class State { kReady, kBlockBarrier, kWarpOp, kDone };

struct WarpSlot {
  unsigned char vals[32][16];
  unsigned mask;
};

struct AsyncCopy {
  uint32_t dst;
  const void* src;
  int bytes;
};

struct Fiber {
  std::vector<std::vector<AsyncCopy>> groups;  // committed cp.async groups, oldest first
  std::vector<AsyncCopy> open;                 // issued, not yet committed
  void* sp = nullptr;
  char* stack = nullptr;
  State state = State::kReady;
  uint3 tid{};
  int lane = 0, warp = 0;
  uint64_t warp_seq = 0;  // warp ops this lane has entered
  void* asan_fake = nullptr;
  unsigned warp_mask = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<std::vector<WarpSlot>> slots;  // [warp][seq % kSlots]
  const std::function<void()>* body = nullptr;
  void* scheduler_sp = nullptr;
  const void* scheduler_bottom = nullptr;  // the host thread's stack (AddressSanitizer)
  size_t scheduler_size = 0;
  void* scheduler_fake = nullptr;
  Fiber* running = nullptr;
  std::vector<unsigned char> smem;
  std::string error;
  std::mt19937_64 rng{12345};
};
constexpr int kSlots = 4;
thread_local Block g;  // one launch at a time per host thread (an emulated rank)

void trampoline() {
  Fiber* f = g.running;
  EMU_ASAN_FINISH(nullptr, &g.scheduler_bottom, &g.scheduler_size);
  try {
    (*g.body)();
  } catch (const std::exception& e) {
    if (g.error.empty()) g.error = e.what();
  } catch (...) {
    if (g.error.empty()) g.error = "unknown exception in a kernel";
  }
  f->state = State::kDone;
  EMU_ASAN_START(nullptr, g.scheduler_bottom, g.scheduler_size);  // this fiber's frames end here
  emu_switch(&f->sp, g.scheduler_sp);
  std::abort();  // a finished fiber is never resumed
}

// Fiber stacks come from one mapping per batch: one VMA, not two per stack with guard pages (64
// emulated ranks of 1024 threads would pass vm.max_map_count). A canary at the low end of each
// stack, checked after every block, catches an overflow instead.
constexpr size_t kStacksPerBatch = 256;
constexpr uint64_t kCanary = 0x5EC7A11CA11AB1E5ull;

struct StackPool {
  std::vector<char*> stacks, batches;
  ~StackPool() {
    for (char* b : batches) munmap(b, kStackBytes * kStacksPerBatch);
  }
  size_t size() const { return stacks.size(); }
  void grow() {
    void* p = mmap(nullptr, kStackBytes * kStacksPerBatch, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("emu: cannot map fiber stacks");
    batches.push_back(static_cast<char*>(p));
    for (size_t i = 0; i < kStacksPerBatch; ++i) stacks.push_back(static_cast<char*>(p) + i * kStackBytes);
  }
  char* operator[](size_t i) const { return stacks[i]; }
};
thread_local StackPool g_stacks;  // per host thread, reused by every launch (fibers come and go)

void init_fiber(Fiber& f, size_t index) {
  while (g_stacks.size() <= index) g_stacks.grow();
  f.stack = g_stacks[index];
  std::memcpy(f.stack, &kCanary, sizeof(kCanary));
  auto top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t{15};
  auto* s = reinterpret_cast<uint64_t*>(top);
  s[-1] = 0;                                          // fake return address of trampoline
  s[-2] = reinterpret_cast<uint64_t>(&trampoline);    // emu_switch's ret lands here
  for (int i = 3; i <= 8; ++i) s[-i] = 0;             // rbp rbx r12 r13 r14 r15
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  std::memcpy(&s[-9], csr, 8);
  f.sp = &s[-9];
  f.state = State::kReady;
  f.warp_seq = 0;
  f.groups.clear();
  f.open.clear();
}

void yield_to_scheduler() {
  Fiber* f = g.running;
  EMU_ASAN_START(&f->asan_fake, g.scheduler_bottom, g.scheduler_size);
  emu_switch(&f->sp, g.scheduler_sp);
  EMU_ASAN_FINISH(f->asan_fake, nullptr, nullptr);
  if (!g.error.empty()) throw Fault("aborted");  // never resumed after an error; kept for safety
}

std::string describe(const Fiber& f) {
  const char* what = f.state == State::kBlockBarrier ? "__syncthreads"
                     : f.state == State::kWarpOp     ? "a warp-synchronous op"
                     : f.state == State::kDone       ? "exit"
                                                     : "running";
  return "thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," + std::to_string(f.tid.z) +
         ") at " + what;
}

// Scheduling: one ready fiber at a time, picked at random, runs until it blocks; a barrier is
// released the moment its last participant arrives. So one warp may run far ahead of the others
// between two __syncthreads (as on the GPU), and code that reads another warp's shared-memory
// writes without a barrier in between sees stale bytes in some of the orders tried.
std::string deadlock_message() {
  const int n = static_cast<int>(g.fibers.size());
  std::string msg = "deadlock: no thread can proceed in block (" + std::to_string(cur.bid.x) + "," +
                    std::to_string(cur.bid.y) + "):";
  int shown = 0;
  for (auto& f : g.fibers)
    if (f.state != State::kDone && shown++ < 6) msg += " " + describe(f) + ";";
  // A lane that exited (or does not exist) while the others wait on a warp op is the usual cause.
  for (auto& f : g.fibers) {
    if (f.state != State::kWarpOp) continue;
    for (int m = 0; m < 32; ++m)
      if ((f.warp_mask >> m & 1u) && (f.warp * 32 + m >= n || g.fibers[f.warp * 32 + m].state == State::kDone)) {
        msg += " lane " + std::to_string(m) + " of warp " + std::to_string(f.warp) +
               " is in the mask but has exited or does not exist;";
        return msg;
      }
  }
  return msg;
}

void run_block() {
  const int n = static_cast<int>(g.fibers.size());
  std::vector<int> ready(n);
  for (int i = 0; i < n; ++i) ready[i] = i;
  int done = 0, at_barrier = 0;
  auto release_block = [&] {
    if (at_barrier == 0 || at_barrier + done < n) return;
    for (int i = 0; i < n; ++i)
      if (g.fibers[i].state == State::kBlockBarrier) g.fibers[i].state = State::kReady, ready.push_back(i);
    at_barrier = 0;
  };
  while (done < n) {
    if (ready.empty()) {
      g.error = deadlock_message();
      return;
    }
    const size_t pick = g.rng() % ready.size();
    const int i = ready[pick];
    ready[pick] = ready.back();
    ready.pop_back();
    Fiber& f = g.fibers[i];
    g.running = &f;
    cur.tid = f.tid;
    EMU_ASAN_START(&g.scheduler_fake, f.stack, kStackBytes);
    emu_switch(&g.scheduler_sp, f.sp);
    EMU_ASAN_FINISH(g.scheduler_fake, nullptr, nullptr);
    g.running = nullptr;
    if (!g.error.empty()) return;
    switch (f.state) {
      case State::kReady: ready.push_back(i); break;  // yielded while spinning
      case State::kDone: ++done, release_block(); break;
      case State::kBlockBarrier: ++at_barrier, release_block(); break;
      case State::kWarpOp: {
        Fiber* lanes = &g.fibers[f.warp * 32];
        const int nl = std::min(32, n - f.warp * 32);
        bool all = true;
        for (int m = 0; m < 32 && all; ++m)
          if (f.warp_mask >> m & 1u)
            all = m < nl && lanes[m].state == State::kWarpOp && lanes[m].warp_seq == f.warp_seq;
        if (all)
          for (int m = 0; m < 32; ++m)
            if (f.warp_mask >> m & 1u) lanes[m].state = State::kReady, ready.push_back(f.warp * 32 + m);
        break;
      }
    }
  }
}

}  // namespace

[[noreturn]] void fail(const std::string& msg) { throw Fault(msg); }

uint64_t global_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

void spin_pause() {
  // Emulated ranks are host threads, often more than the cores: a spinning one sleeps now and
  // then, or the ranks doing the work it waits for starve (and it times out).
  static thread_local unsigned n = 0;
  if (++n % 64 == 0) usleep(50);
  if (g.running) yield_to_scheduler();  // stays ready: the scheduler runs the block's other fibers first
}

void* dynamic_smem() { return g.smem.data(); }

// cp.async: the copy happens when a wait_group covers its group, so code that reads the shared
// memory before waiting sees the old bytes, as it may on the GPU.
void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  if (!g.running) fail("cp.async outside a kernel");
  if (dst % 16 || dst + 16 > g.smem.size()) fail("cp.async: shared address out of range or misaligned");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16) fail("cp.async: misaligned global address");
  g.running->open.push_back({dst, src, src_bytes});
}
void cp_async_commit() {
  Fiber* f = g.running;
  f->groups.push_back(std::move(f->open));
  f->open.clear();
}
void cp_async_wait(int pending) {
  Fiber* f = g.running;
  while (static_cast<int>(f->groups.size()) > pending) {
    for (const AsyncCopy& c : f->groups.front()) {
      unsigned char* d = g.smem.data() + c.dst;
      std::memset(d, 0, 16);
      if (c.bytes > 0) std::memcpy(d, c.src, c.bytes);
    }
    f->groups.erase(f->groups.begin());
  }
}

int lane_id() { return g.running ? g.running->lane : 0; }

void sync_block() {
  if (!g.running) fail("__syncthreads outside a kernel");
  g.running->state = State::kBlockBarrier;
  yield_to_scheduler();
}

unsigned warp_exchange(unsigned mask, const void* mine, size_t bytes, unsigned char (*all)[16]) {
  Fiber* f = g.running;
  if (!f) fail("warp op outside a kernel");
  if (!(mask >> f->lane & 1u)) fail("warp op: the calling lane is not in its own mask");
  WarpSlot& s = g.slots[f->warp][f->warp_seq % kSlots];
  if (bytes) std::memcpy(s.vals[f->lane], mine, bytes);
  f->warp_mask = mask;
  f->state = State::kWarpOp;
  yield_to_scheduler();
  // Every lane of the mask posted before any was released; the slot is not reused until
  // kSlots ops later, which no lane reaches before all have read this one.
  std::memcpy(all, s.vals, sizeof(s.vals));
  ++f->warp_seq;
  return mask;
}

void launch_impl(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024) fail("launch: block of " + std::to_string(threads) + " threads");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("launch: empty grid");
  if (grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) fail("launch: grid too large");
  if (smem > static_cast<size_t>(smem_optin)) fail("launch: too much dynamic shared memory");
  if (g.running) fail("launch from device code");
  // EMU_SEED seeds each host thread's schedule once (later launches draw new orders from it).
  static const char* seed = std::getenv("EMU_SEED");
  static thread_local bool seeded = false;
  if (seed && !seeded) g.rng.seed(std::strtoull(seed, nullptr, 10));
  seeded = true;
  g.body = &body;
  g.error.clear();
  g.fibers.resize(threads);
  g.slots.assign((threads + 31) / 32, std::vector<WarpSlot>(kSlots));
  cur.bdim = {block.x, block.y, block.z};
  cur.gdim = {grid.x, grid.y, grid.z};
  std::vector<uint64_t> blocks(uint64_t{grid.x} * grid.y * grid.z);
  for (uint64_t i = 0; i < blocks.size(); ++i) blocks[i] = i;
  std::shuffle(blocks.begin(), blocks.end(), g.rng);
  for (uint64_t b : blocks) {
    cur.bid = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                    static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
    // Shared memory starts as garbage, as on the GPU.
    g.smem.assign(smem + 16, 0xA5);
    for (uint64_t t = 0; t < threads; ++t) {
      Fiber& f = g.fibers[t];
      init_fiber(f, t);
      f.tid = {static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
               static_cast<unsigned>(t / (uint64_t{block.x} * block.y))};
      f.lane = static_cast<int>(t % 32);
      f.warp = static_cast<int>(t / 32);
    }
    run_block();
    for (uint64_t t = 0; t < threads && g.error.empty(); ++t) {
      uint64_t c;
      std::memcpy(&c, g.fibers[t].stack, sizeof(c));
      if (c != kCanary) g.error = "thread " + std::to_string(t) + " overflowed its emulated stack";
    }
    if (!g.error.empty()) {
      const std::string msg = g.error;
      g.error.clear();
      throw Fault("emulated kernel failed in block " + std::to_string(b) + ": " + msg);
    }
  }
}

}  // namespace emu
