// Self-test of the benchmark harness (bench/common.cuh). The host part (flag parsing, sweeps,
// statistics, checks) runs anywhere, including CI machines without a GPU; the timing and JSON
// part runs only when a device is present. Exit status 0 = all checks passed.
#include <cstdio>

#include "common.cuh"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) std::fprintf(stderr, "FAILED: %s\n", what), ++failures;
}

void host_checks() {
  int64_t v = 0;
  expect(moe_bench::parse_size("16K", &v) && v == 16384, "parse_size 16K");
  expect(moe_bench::parse_size("1.5M", &v) && v == 3 * (1ll << 19), "parse_size 1.5M");
  expect(!moe_bench::parse_size("12q", &v) && !moe_bench::parse_size("", &v), "parse_size rejects junk");
  std::vector<int64_t> shape;
  expect(moe_bench::parse_shape("16384x7168x8", &shape) && shape == std::vector<int64_t>({16384, 7168, 8}),
         "parse_shape");
  expect(!moe_bench::parse_shape("16x", &shape), "parse_shape rejects a trailing x");

  moe_bench::Cli cli("test_common", "harness self-test");
  int64_t hidden = 7168;
  cli.add_int("-H", "--hidden", &hidden, "hidden size");
  const char* argv[] = {"test_common", "-b", "1K", "-e", "8K", "-f", "2", "-n", "7", "-c", "0",
                        "--hidden=4096", "-s", "2x3,4x5x6", "-d", "fp32"};
  moe_bench::Options o = cli.parse(16, const_cast<char**>(argv), 1, 2);
  expect(o.sweep() == std::vector<int64_t>({1024, 2048, 4096, 8192}), "sweep by factor");
  expect(o.iters == 7 && !o.check && hidden == 4096, "-n, -c and an extra long flag with '='");
  expect(o.shapes.size() == 2 && o.shapes[1] == std::vector<int64_t>({4, 5, 6}), "-s shape list");
  expect(o.dtype == moe_bench::DType::kF32 && moe_bench::dtype_size(o.dtype) == 4, "-d fp32");
  o.step_increment = 3000;
  expect(o.sweep() == std::vector<int64_t>({1024, 4024, 7024}), "sweep by increment");

  const moe_bench::Timing t = moe_bench::summarize({4, 1, 3, 2});
  expect(t.median_us == 2.5 && t.min_us == 1 && std::fabs(t.stddev_us - 1.2909944) < 1e-6, "summarize");

  std::vector<float> want = {1, 2, 3}, got = {1, 2.001f, NAN};
  expect(moe_bench::count_wrong(got, want, 1e-2, 0) == 1, "count_wrong counts NaN, tolerates 1e-3");
  for (uint64_t i = 0; i < 1000; ++i) {
    const float u = moe_bench::uniform_at(7, i, -1, 1);
    if (!(u >= -1 && u < 1)) expect(false, "uniform_at in [lo, hi)");
  }
}

int device_checks(const moe_bench::Options& o, const moe_bench::Cli& cli) {
  moe_bench::Bench bench(o, cli, moe_bench::Ceiling::kCopy);
  for (int64_t n : o.sweep()) {
    moe_bench::DeviceBuffer<__nv_bfloat16> buf(static_cast<size_t>(n));
    moe_bench::fill_uniform(buf.get(), buf.size(), -1, 1, 42, bench.stream());
    MOE_CUDA_CHECK(cudaStreamSynchronize(bench.stream()));
    std::vector<float> want(buf.size());
    for (size_t i = 0; i < want.size(); ++i) want[i] = moe_bench::uniform_at(42, i, -1, 1);
    const int64_t wrong = moe_bench::count_wrong(buf.to_host(), want, 0, 1.0 / 128);  // bf16 rounding
    const moe_bench::Timing t =
        bench.time([&] { moe_bench::fill_uniform(buf.get(), buf.size(), -1, 1, 42, bench.stream()); });
    bench.row("n=" + std::to_string(n), t, 2.0 * n, 0, wrong);
  }
  return bench.finish();
}

}  // namespace

int main(int argc, char** argv) {
  host_checks();
  std::printf("host checks: %s\n", failures ? "FAILED" : "ok");
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: timing and JSON not exercised\n");
    return failures ? 1 : 0;
  }
  moe_bench::Cli cli("test_common", "fill_uniform<bf16> as a stand-in stage");
  const moe_bench::Options o = cli.parse(argc, argv, 1 << 20, 1 << 26);
  const int status = moe_bench::guarded_main([&] { return device_checks(o, cli); });
  return failures ? 1 : status;
}
