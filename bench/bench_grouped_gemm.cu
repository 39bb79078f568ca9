// bench_grouped_gemm: the grouped expert GEMM (csrc/kernels/grouped_gemm.cu), torch-free.
//
// A case is -s MxExKxN: M rows of a split over E experts, a [M, K] @ b[e] [K, N] (or [E, N, K] with
// -t 1). Each case runs with uniform expert loads (M / E rows each) and Zipf(1.2) loads (expert e
// gets M * (e+1)^-1.2 / sum), -l picks. The counts live on the device: one launch, no host sync.
// TFLOP/s counts useful FLOPs, 2 * M * K * N (rows past the groups and tile padding excluded);
// %ceil is TFLOP/s / 764 (dense bf16 cuBLAS 8192^3 on the lent H100, ../shared/GPU.md). algbw
// counts a + the weights of experts with rows + out, for memory-bound (decode) cases: compare it
// with the 2950 GB/s copy ceiling. -g 1 adds weight-gradient rows per case (dW_e = a_e^T dy_e, or
// dy_e^T a_e with -t 1; FLOPs 2 * M * K * N'), one per kernel of -W (default portable,sm90: both
// timed in the same run, through MOE_EXT_GROUPED_WGRAD_KERNEL; a kernel that cannot run here is
// skipped with a '#' line saying why). The weight gradient's floors and predictions:
//   32768 x 8 x 4096 x 14336   3.848e12 FLOPs   5037 us compute floor
//   portable (mma.sync, ldmatrix.trans on both operands) ~250-330 TFLOP/s; sm90 first version (the
//   forward's structure, wait<0> per stage, 128x128 tiles) ~430-550 TFLOP/s. Not measured yet.
//
// Floors on the H100 (764 TFLOP/s, 2.95 TB/s), bf16, no activation:
//   shape                      FLOPs      compute floor   bytes      memory floor
//   32768 x 8 x 4096 x 14336   3.848e12   5037 us         2.147e9    728 us
//   32768 x 32 x 7168 x 4096   1.924e12   2518 us         2.617e9    887 us
//   32768 x 32 x 2048 x 7168   9.621e11   1259 us         1.544e9    523 us
//   512 x 32 x 7168 x 4096     3.006e10     39 us         1.891e9    641 us  (decode: memory-bound)
// torch._grouped_mm on the same machine: 633, 666, 614 TFLOP/s for the three prefill shapes.
// Prediction before any GPU run (none was available when this was written). Portable mma.sync
// kernel (every device; MOE_EXT_GROUPED_GEMM_KERNEL=portable on Hopper): prefill
// ~280-350 TFLOP/s (37-46% of 764: mma.sync issues at about half of wgmma's rate on Hopper, and
// the kernel has one 128x128 tile per warp-set without fragment double-buffering), Zipf within
// 5% of uniform (only the last m-tile of each expert is partial); decode ~0.75-0.85 ms (75-85%
// of the copy ceiling: 64-row tiles, every weight byte read once, 8+ MB of loads in flight).
// The Hopper kernel (TMA + wgmma, 128x128 tiles, one producer and two consumer warpgroups,
// chosen automatically on sm_90; MOE_EXT_GROUPED_GEMM_KERNEL=portable|sm90 forces one), first
// version: ~480-580 TFLOP/s (63-76%) on the prefill shapes: each consumer waits for its wgmma
// batch before releasing the stage (no MMA/MMA overlap inside a warpgroup), 128x128 tiles (CUTLASS's
// best are 128x256 with 2 consumers), the consumers' epilogue does not overlap their next MMAs
// (the producer does prefetch the next tile meanwhile); decode ~0.70-0.80 ms (80-90% of the copy ceiling; 4 x 32 KB stages in flight per SM).
// The issue's target (>= 80% of 764) needs the next steps listed in csrc/kernels/grouped_gemm.cuh.
//
// '#wrong' checks a sample of output elements (-S, default 512; rows past the groups included,
// which must be 0) against float64 dot products of the same rounded inputs, regenerated on the
// host from the fill's counter hash: |got - want| <= 1e-2 + 2^-7 |want| (bf16; fp16 2^-9).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "kernels/api.cuh"

namespace {

namespace k = moe_ext::kernels;
using moe_bench::DeviceBuffer;

constexpr uint64_t kSeedA = 11, kSeedB = 12, kSeedDy = 13;

struct Case {
  int64_t M, E, K, N;
  bool zipf;
};

std::vector<int64_t> make_counts(int64_t M, int64_t E, bool zipf) {
  std::vector<int64_t> c(E, 0);
  if (!zipf) {
    for (int64_t e = 0; e < E; ++e) c[e] = M / E + (e < M % E ? 1 : 0);
    return c;
  }
  std::vector<double> w(E);
  double sum = 0;
  for (int64_t e = 0; e < E; ++e) sum += w[e] = std::pow(static_cast<double>(e + 1), -1.2);
  int64_t used = 0;
  for (int64_t e = 0; e < E; ++e) used += c[e] = static_cast<int64_t>(std::floor(M * w[e] / sum));
  for (int64_t e = 0; used < M; e = (e + 1) % E, ++used) ++c[e];
  return c;
}

// The element the device fill put at index i, as the kernel sees it (rounded to T).
template <class T>
double elem(uint64_t seed, uint64_t i, float lo, float hi) {
  return moe_bench::to_double(moe_bench::from_float<T>(moe_bench::uniform_at(seed, i, lo, hi)));
}

template <class T>
T read_one(const T* p) {
  T v;
  MOE_CUDA_CHECK(cudaMemcpy(&v, p, sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

struct GemmOptions {
  bool trans_b = false, swiglu = false, masked = false, wgrad = false;
  int64_t samples = 512;
  std::vector<std::string> wgrad_kernels = {"portable", "sm90"};  // MOE_EXT_GROUPED_WGRAD_KERNEL values
};

// Sets MOE_EXT_GROUPED_WGRAD_KERNEL for the life of the object, then restores what was there.
class ScopedWgradKernel {
 public:
  explicit ScopedWgradKernel(const std::string& value) {
    if (const char* old = std::getenv(kName)) had_ = true, old_ = old;
    setenv(kName, value.c_str(), 1);
  }
  ~ScopedWgradKernel() {
    if (had_) setenv(kName, old_.c_str(), 1);
    else unsetenv(kName);
  }
  ScopedWgradKernel(const ScopedWgradKernel&) = delete;
  ScopedWgradKernel& operator=(const ScopedWgradKernel&) = delete;

 private:
  static constexpr const char* kName = "MOE_EXT_GROUPED_WGRAD_KERNEL";
  bool had_ = false;
  std::string old_;
};

template <class T>
int run_case(moe_bench::Bench& bench, const Case& c, const GemmOptions& o) {
  const int64_t M = c.M, E = c.E, K = c.K, N = c.N;
  const int64_t n_out = o.swiglu ? N / 2 : N;
  const std::vector<int64_t> counts = make_counts(M, E, c.zipf);
  const int64_t max_count = *std::max_element(counts.begin(), counts.end());
  // Masked: a [E, max_rows, K] with max_rows = the largest count; contiguous: a [M, K].
  const int64_t rows_total = o.masked ? E * max_count : M;
  std::vector<int64_t> begin(E, 0);
  for (int64_t e = 1; e < E; ++e) begin[e] = o.masked ? e * max_count : begin[e - 1] + counts[e - 1];
  const float b_range = std::sqrt(3.0f / static_cast<float>(std::max<int64_t>(K, 1)));  // var(b) = 1/K

  DeviceBuffer<T> a(rows_total * K), b(E * K * N), out(rows_total * n_out);
  DeviceBuffer<int32_t> sizes(E);
  sizes.from_host(std::vector<int32_t>(counts.begin(), counts.end()));
  moe_bench::fill_uniform(a.get(), a.size(), -1.f, 1.f, kSeedA, bench.stream());
  moe_bench::fill_uniform(b.get(), b.size(), -b_range, b_range, kSeedB, bench.stream());
  if (out.size()) MOE_CUDA_CHECK(cudaMemsetAsync(out.get(), 0xFF, out.size() * sizeof(T), bench.stream()));

  k::GroupedGemmParams p;
  p.dtype = std::is_same_v<T, __half> ? k::GemmFloat::kFloat16 : k::GemmFloat::kBFloat16;
  p.groups.layout = o.masked ? k::GemmLayout::kMasked : k::GemmLayout::kContiguous;
  p.groups.sizes = sizes.get();
  p.groups.num_experts = E;
  p.groups.rows = o.masked ? max_count : M;
  p.a = a.get();
  p.b = b.get();
  p.out = out.get();
  p.k = K;
  p.n = N;
  p.trans_b = o.trans_b;
  p.activation = o.swiglu ? k::GemmActivation::kSwiglu : k::GemmActivation::kNone;
  if (const char* why = k::grouped_gemm_unsupported(p)) throw std::runtime_error(why);

  // One run, then the sampled check.
  k::grouped_gemm(p, bench.stream());
  MOE_CUDA_CHECK(cudaStreamSynchronize(bench.stream()));
  const double rtol = std::is_same_v<T, __half> ? 1.0 / 512 : 1.0 / 128;
  auto a_at = [&](int64_t r, int64_t kk) { return elem<T>(kSeedA, r * K + kk, -1.f, 1.f); };
  auto b_at = [&](int64_t e, int64_t kk, int64_t n) {
    const int64_t i = o.trans_b ? (e * N + n) * K + kk : (e * K + kk) * N + n;
    return elem<T>(kSeedB, i, -b_range, b_range);
  };
  int64_t wrong = -1;
  if (bench.options().check) {
    wrong = 0;
    for (int64_t s = 0; s < o.samples && rows_total * n_out > 0; ++s) {
      const int64_t r = static_cast<int64_t>(moe_bench::uniform_at(77, 2 * s, 0.f, 1.f) * rows_total) % rows_total;
      const int64_t n = static_cast<int64_t>(moe_bench::uniform_at(77, 2 * s + 1, 0.f, 1.f) * n_out) % n_out;
      int64_t e = -1;
      for (int64_t x = 0; x < E; ++x)
        if (r >= begin[x] && r < begin[x] + counts[x]) e = x;
      double want = 0;
      if (e >= 0) {
        double h = 0, u = 0;
        for (int64_t kk = 0; kk < K; ++kk) {
          h += a_at(r, kk) * b_at(e, kk, n);
          if (o.swiglu) u += a_at(r, kk) * b_at(e, kk, n_out + n);
        }
        want = o.swiglu ? h / (1.0 + std::exp(-h)) * u : h;
      }
      const double got = moe_bench::to_double(read_one(out.get() + r * n_out + n));
      wrong += !(std::fabs(got - want) <= 1e-2 + rtol * std::fabs(want));
    }
  }

  const std::string tag = std::to_string(M) + "x" + std::to_string(E) + "x" + std::to_string(K) + "x" +
                          std::to_string(N) + (c.zipf ? " zipf" : " uniform");
  int64_t experts_with_rows = 0;
  for (int64_t v : counts) experts_with_rows += v > 0;
  const double flops = 2.0 * M * K * N;
  const double bytes = sizeof(T) * (static_cast<double>(M) * K + static_cast<double>(experts_with_rows) * K * N +
                                    static_cast<double>(rows_total) * n_out);
  std::printf("# %s: max %lld rows/expert; floors %.0f us (compute) %.0f us (memory); kernel %s\n", tag.c_str(),
              static_cast<long long>(max_count), flops / (bench.options().ceil_tflops * 1e6),
              bytes / (bench.options().ceil_bw_gbps * 1e3), k::grouped_gemm_kernel_name(p));
  const moe_bench::Timing t = bench.time([&] { k::grouped_gemm(p, bench.stream()); });
  bench.row(tag + (o.swiglu ? " swiglu" : ""), t, bytes, flops, wrong);

  if (o.wgrad) {
    DeviceBuffer<T> dy(rows_total * n_out), dw(E * K * n_out);
    moe_bench::fill_uniform(dy.get(), dy.size(), -1.f, 1.f, kSeedDy, bench.stream());
    k::GroupedGemmWgradParams w;
    w.dtype = p.dtype;
    w.groups = p.groups;
    w.a = a.get();
    w.grad_out = dy.get();
    w.grad_b = dw.get();
    w.k = K;
    w.n = n_out;
    w.trans_b = o.trans_b;
    const double wflops = 2.0 * M * K * n_out;
    const double wbytes = sizeof(T) * (static_cast<double>(M) * (K + n_out) + static_cast<double>(E) * K * n_out);
    for (const std::string& kernel : o.wgrad_kernels) {
      const ScopedWgradKernel env(kernel);
      const char* name = nullptr;
      try {
        name = k::grouped_gemm_wgrad_kernel_name(w);  // throws where a forced kernel cannot run
      } catch (const std::exception& ex) {
        std::printf("# %s wgrad %s: skipped: %s\n", tag.c_str(), kernel.c_str(), ex.what());
        continue;
      }
      std::printf("# %s wgrad: kernel %s\n", tag.c_str(), name);
      // Poisoned (0xFF: NaN) before the checked run, so that an element never written is wrong.
      MOE_CUDA_CHECK(cudaMemsetAsync(dw.get(), 0xFF, dw.size() * sizeof(T), bench.stream()));
      k::grouped_gemm_wgrad(w, bench.stream());
      MOE_CUDA_CHECK(cudaStreamSynchronize(bench.stream()));
      int64_t wwrong = -1;
      if (bench.options().check) {
        wwrong = 0;
        for (int64_t s = 0; s < std::min<int64_t>(o.samples, 64); ++s) {
          const int64_t e = static_cast<int64_t>(moe_bench::uniform_at(78, 3 * s, 0.f, 1.f) * E) % E;
          const int64_t kk = static_cast<int64_t>(moe_bench::uniform_at(78, 3 * s + 1, 0.f, 1.f) * K) % K;
          const int64_t n = static_cast<int64_t>(moe_bench::uniform_at(78, 3 * s + 2, 0.f, 1.f) * n_out) % n_out;
          double want = 0;
          for (int64_t r = begin[e]; r < begin[e] + counts[e]; ++r)
            want += a_at(r, kk) * elem<T>(kSeedDy, r * n_out + n, -1.f, 1.f);
          const int64_t idx = o.trans_b ? (e * n_out + n) * K + kk : (e * K + kk) * n_out + n;
          const double got = moe_bench::to_double(read_one(dw.get() + idx));
          const double atol = 1e-2 * std::max(1.0, std::sqrt(static_cast<double>(counts[e])));
          wwrong += !(std::fabs(got - want) <= atol + rtol * std::fabs(want));
        }
      }
      const moe_bench::Timing tw = bench.time([&] { k::grouped_gemm_wgrad(w, bench.stream()); });
      bench.row(tag + " wgrad " + kernel, tw, wbytes, wflops, wwrong);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  moe_bench::Cli cli("bench_grouped_gemm",
                     "grouped expert GEMM, counts on the device; cases -s MxExKxN (default: the issue's prefill "
                     "and decode shapes)");
  std::string load = "both", activation = "none";
  bool trans_b = false, masked = false, wgrad = false;
  int64_t samples = 512;
  cli.add_string("-l", "--load", &load, "expert loads: uniform, zipf or both");
  cli.add_string("-a", "--activation", &activation, "none or swiglu (output N/2)");
  cli.add_bool("-t", "--trans_b", &trans_b, "b as [E, N, K] (nn.Linear weights) (0/1)");
  cli.add_bool("-m", "--masked", &masked, "masked layout a [E, max_rows, K], max_rows = the largest count (0/1)");
  std::string wgrad_kernels = "portable,sm90";
  cli.add_bool("-g", "--wgrad", &wgrad, "also time the weight gradient, a row per case and kernel (0/1)");
  cli.add_string("-W", "--wgrad_kernels", &wgrad_kernels,
                 "weight-gradient kernels to time with -g 1, comma-separated: portable, sm90, auto");
  cli.add_int("-S", "--samples", &samples, "output elements checked per case");
  moe_bench::Options opts = cli.parse(argc, argv, 0, 0);
  return moe_bench::guarded_main([&] {
    if (load != "uniform" && load != "zipf" && load != "both") throw std::runtime_error("bad -l " + load);
    if (activation != "none" && activation != "swiglu") throw std::runtime_error("bad -a " + activation);
    if (opts.dtype == moe_bench::DType::kF32)
      throw std::runtime_error("the grouped GEMM kernel takes bf16 or fp16 (-d bf16 / fp16)");
    std::vector<std::vector<int64_t>> shapes = opts.shapes;
    if (shapes.empty())
      shapes = {{32768, 8, 4096, 14336}, {32768, 32, 7168, 4096}, {32768, 32, 2048, 7168}, {512, 32, 7168, 4096}};
    GemmOptions o;
    o.trans_b = trans_b, o.swiglu = activation == "swiglu", o.masked = masked, o.wgrad = wgrad, o.samples = samples;
    o.wgrad_kernels.clear();
    for (size_t pos = 0; pos <= wgrad_kernels.size();) {
      const size_t comma = std::min(wgrad_kernels.find(',', pos), wgrad_kernels.size());
      const std::string name = wgrad_kernels.substr(pos, comma - pos);
      if (name != "portable" && name != "sm90" && name != "auto") throw std::runtime_error("bad -W " + name);
      o.wgrad_kernels.push_back(name);
      pos = comma + 1;
    }
    moe_bench::Bench bench(opts, cli, moe_bench::Ceiling::kBf16Matmul);
    for (const std::vector<int64_t>& s : shapes) {
      if (s.size() != 4) throw std::runtime_error("-s takes MxExKxN cases");
      for (const bool zipf : {false, true}) {
        if ((zipf && load == "uniform") || (!zipf && load == "zipf")) continue;
        const Case c{s[0], s[1], s[2], s[3], zipf};
        if (opts.dtype == moe_bench::DType::kF16) run_case<__half>(bench, c, o);
        else run_case<__nv_bfloat16>(bench, c, o);
      }
    }
    return bench.finish();
  });
}
