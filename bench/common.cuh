// Harness shared by the torch-free C++ benchmarks (bench/bench_*.cu), modelled on nccl-tests:
// every benchmark takes the same flags, times with CUDA events, and prints one table row per
// case with the units in '#' header rows, a '#wrong' column filled by its own check, and an
// average footer; -J also writes the rows as JSON so runs can be compared by scripts.
//
//   int main(int argc, char** argv) {
//     moe_bench::Cli cli("bench_permute", "permute x[T,H] into expert-major rows");
//     int64_t hidden = 7168;
//     cli.add_int("-H", "--hidden", &hidden, "hidden size");
//     moe_bench::Options opts = cli.parse(argc, argv, /*min=*/1024, /*max=*/16384);
//     return moe_bench::guarded_main([&] {
//       moe_bench::Bench bench(opts, cli, moe_bench::Ceiling::kCopy);
//       for (int64_t tokens : opts.sweep()) {
//         ... allocate, fill_uniform(...), run once and check ...
//         moe_bench::Timing t = bench.time([&] { launch_permute(..., bench.stream()); });
//         bench.row("T=" + std::to_string(tokens), t, bytes, /*flops=*/0, wrong);
//       }
//       return bench.finish();
//     });
//   }
//
// Errors: MOE_CUDA_CHECK and friends from csrc/kernels/exception.cuh throw moe_ext::Error;
// guarded_main turns any exception into a message and exit status 2. Exiting directly (exit())
// is reserved for benchmarks: this header does it only for -h and malformed flags.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels/exception.cuh"

namespace moe_bench {

// Roofline ceilings measured on the lent H100 (../shared/GPU.md). On another device pass
// --ceil_bw / --ceil_tflops: the '%ceil' column is only as meaningful as its ceiling.
constexpr double kCopyCeilingGBps = 2950.0;    // 1 GiB device-to-device copy, bytes read + written
constexpr double kBf16CeilingTflops = 764.0;   // dense bf16 matmul 8192^3 through cuBLAS

// Which ceiling '%ceil' is measured against: memory-bound stages compare their algbw with the
// copy ceiling, GEMMs their TFLOP/s with the matmul ceiling.
enum class Ceiling { kCopy, kBf16Matmul };

enum class DType { kBF16, kF16, kF32 };

inline const char* dtype_name(DType t) { return t == DType::kBF16 ? "bf16" : t == DType::kF16 ? "fp16" : "fp32"; }
inline size_t dtype_size(DType t) { return t == DType::kF32 ? 4 : 2; }

struct Options {
  int64_t min_size = 0, max_size = 0;  // -b/-e: what a "size" is (tokens, bytes...) is the benchmark's
  int64_t step_factor = 2;             // -f: multiply per step ...
  int64_t step_increment = 0;          // -i: ... or add, when > 0 (as in nccl-tests)
  std::vector<std::vector<int64_t>> shapes;  // -s "16384x7168x8,4096x7168x8": explicit cases
  int64_t iters = 20, warmup = 5;
  bool check = true;
  bool flush_l2 = true;  // see Bench::time
  int64_t device = 0;
  DType dtype = DType::kBF16;
  std::string json_path;
  double ceil_bw_gbps = kCopyCeilingGBps, ceil_tflops = kBf16CeilingTflops;
  std::string command_line;

  // The sizes -b/-e/-f/-i describe, in increasing order.
  std::vector<int64_t> sweep() const {
    std::vector<int64_t> sizes;
    for (int64_t s = min_size; s <= max_size && s > 0;) {
      sizes.push_back(s);
      const int64_t next = step_increment > 0 ? s + step_increment : s * step_factor;
      if (next <= s) break;  // a factor of 1 would never end
      s = next;
    }
    return sizes;
  }
};

// "16384x7168x8" -> {16384, 7168, 8}; K/M/G suffixes are powers of 1024, as nccl-tests reads -b/-e.
inline bool parse_size(const std::string& text, int64_t* out) {
  if (text.empty()) return false;
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  int64_t mult = 1;
  if (*end == 'K' || *end == 'k') mult = 1ll << 10, ++end;
  else if (*end == 'M' || *end == 'm') mult = 1ll << 20, ++end;
  else if (*end == 'G' || *end == 'g') mult = 1ll << 30, ++end;
  if (end == text.c_str() || *end != '\0' || v < 0) return false;
  *out = static_cast<int64_t>(v * mult);
  return true;
}

inline bool parse_shape(const std::string& text, std::vector<int64_t>* out) {
  out->clear();
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t x = std::min(text.find('x', pos), text.size());
    int64_t v;
    if (!parse_size(text.substr(pos, x - pos), &v)) return false;
    out->push_back(v);
    pos = x + 1;
  }
  return !out->empty();
}

// "8,16,32" -> {8, 16, 32} (a flag's list of values); throws naming the flag on a bad one.
inline std::vector<int64_t> parse_list(const std::string& text, const std::string& flag) {
  std::vector<int64_t> out;
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t comma = std::min(text.find(',', pos), text.size());
    int64_t v;
    if (!parse_size(text.substr(pos, comma - pos), &v)) throw std::runtime_error("bad value in " + flag + " " + text);
    out.push_back(v);
    pos = comma + 1;
  }
  return out;
}

// Flags common to every benchmark plus the ones a benchmark adds. A hand-rolled parser rather
// than getopt_long so that a benchmark's extra flags join the same table and the same -h text.
class Cli {
 public:
  Cli(std::string name, std::string what) : name_(std::move(name)), what_(std::move(what)) {}

  void add_int(const char* short_flag, const char* long_flag, int64_t* target, const char* help) {
    flags_.push_back({short_flag, long_flag, help, [target](const std::string& v) { return parse_size(v, target); },
                      [target] { return std::to_string(*target); }});
  }
  void add_double(const char* short_flag, const char* long_flag, double* target, const char* help) {
    flags_.push_back({short_flag, long_flag, help,
                      [target](const std::string& v) {
                        char* end = nullptr;
                        *target = std::strtod(v.c_str(), &end);
                        return !v.empty() && *end == '\0';
                      },
                      [target] { return fmt("%g", *target); }});
  }
  void add_string(const char* short_flag, const char* long_flag, std::string* target, const char* help) {
    flags_.push_back({short_flag, long_flag, help, [target](const std::string& v) { return *target = v, true; },
                      [target] { return *target; }});
  }
  void add_bool(const char* short_flag, const char* long_flag, bool* target, const char* help) {
    flags_.push_back({short_flag, long_flag, help,
                      [target](const std::string& v) {
                        if (v != "0" && v != "1") return false;
                        return *target = v == "1", true;
                      },
                      [target] { return std::string(*target ? "1" : "0"); }});
  }

  // Defaults for -b/-e come from the benchmark. Exits on -h (status 0) or a bad flag (status 1).
  Options parse(int argc, char** argv, int64_t default_min, int64_t default_max) {
    Options o;
    o.min_size = default_min, o.max_size = default_max;
    std::string shapes, dtype = "bf16";
    std::vector<Flag> extra = std::move(flags_);  // the common flags come first in -h
    flags_.clear();
    add_int("-b", "--minsize", &o.min_size, "smallest size of the sweep (K/M/G suffixes)");
    add_int("-e", "--maxsize", &o.max_size, "largest size of the sweep");
    add_int("-f", "--stepfactor", &o.step_factor, "multiply the size by this per step");
    add_int("-i", "--stepincrement", &o.step_increment, "add this per step instead (when > 0)");
    add_string("-s", "--shapes", &shapes, "explicit cases instead of the sweep, e.g. 16384x7168x8,512x7168x8");
    add_int("-n", "--iters", &o.iters, "timed iterations per case");
    add_int("-w", "--warmup_iters", &o.warmup, "untimed iterations before timing");
    add_bool("-c", "--check", &o.check, "check results (0/1); '#wrong' is N/A when off");
    add_bool("-L", "--flush_l2", &o.flush_l2, "evict L2 before every timed iteration (0/1)");
    add_string("-d", "--datatype", &dtype, "element type: bf16, fp16 or fp32");
    add_int("-D", "--device", &o.device, "CUDA device index");
    add_string("-J", "--json", &o.json_path, "also write the results as JSON to this file");
    add_double("", "--ceil_bw", &o.ceil_bw_gbps, "copy ceiling in GB/s for '%ceil'");
    add_double("", "--ceil_tflops", &o.ceil_tflops, "matmul ceiling in TFLOP/s for '%ceil'");
    flags_.insert(flags_.end(), extra.begin(), extra.end());

    for (int i = 0; i < argc; ++i) o.command_line += (i ? " " : "") + std::string(argv[i]);
    for (int i = 1; i < argc; ++i) {
      std::string arg = argv[i], value;
      if (arg == "-h" || arg == "--help") usage(0);
      const size_t eq = arg.find('=');
      if (arg.rfind("--", 0) == 0 && eq != std::string::npos) value = arg.substr(eq + 1), arg = arg.substr(0, eq);
      const Flag* flag = nullptr;
      for (const Flag& f : flags_)
        if (arg == f.short_flag || arg == f.long_flag) flag = &f;
      if (flag == nullptr) fail("unknown flag " + arg);
      if (value.empty() && eq == std::string::npos) {
        if (i + 1 >= argc) fail("flag " + arg + " needs a value");
        value = argv[++i];
      }
      if (!flag->set(value)) fail("bad value '" + value + "' for " + arg);
    }
    if (!shapes.empty()) {
      size_t pos = 0;
      while (pos <= shapes.size()) {
        const size_t comma = std::min(shapes.find(',', pos), shapes.size());
        std::vector<int64_t> shape;
        if (!parse_shape(shapes.substr(pos, comma - pos), &shape)) fail("bad shape in -s " + shapes);
        o.shapes.push_back(shape);
        pos = comma + 1;
      }
    }
    if (dtype == "bf16") o.dtype = DType::kBF16;
    else if (dtype == "fp16") o.dtype = DType::kF16;
    else if (dtype == "fp32") o.dtype = DType::kF32;
    else fail("bad -d " + dtype + " (bf16, fp16 or fp32)");
    if (o.iters < 1 || o.warmup < 0) fail("-n must be >= 1 and -w >= 0");
    if (o.step_factor < 1) fail("-f must be >= 1");
    return o;
  }

  const std::string& name() const { return name_; }
  const std::string& what() const { return what_; }

  static std::string fmt(const char* format, double v) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), format, v);
    return buf;
  }

 private:
  struct Flag {
    std::string short_flag, long_flag, help;
    std::function<bool(const std::string&)> set;
    std::function<std::string()> show;
  };

  [[noreturn]] void fail(const std::string& msg) {
    std::fprintf(stderr, "%s: %s (see -h)\n", name_.c_str(), msg.c_str());
    std::exit(1);
  }
  [[noreturn]] void usage(int status) {
    std::printf("%s: %s\n", name_.c_str(), what_.c_str());
    for (const Flag& f : flags_)
      std::printf("  %-3s %-18s %s [%s]\n", f.short_flag.c_str(), f.long_flag.c_str(), f.help.c_str(),
                  f.show().c_str());
    std::exit(status);
  }

  std::string name_, what_;
  std::vector<Flag> flags_;
};

struct Timing {
  double median_us = 0, stddev_us = 0, min_us = 0;
  int64_t iters = 0;
};

// Median and sample standard deviation of per-iteration times. The median, not the mean, is
// reported because a single preempted iteration would otherwise move the row.
inline Timing summarize(std::vector<double> us) {
  Timing t;
  t.iters = static_cast<int64_t>(us.size());
  if (us.empty()) return t;
  std::sort(us.begin(), us.end());
  const size_t n = us.size();
  t.median_us = n % 2 ? us[n / 2] : 0.5 * (us[n / 2 - 1] + us[n / 2]);
  t.min_us = us.front();
  double mean = 0, var = 0;
  for (double v : us) mean += v / n;
  for (double v : us) var += (v - mean) * (v - mean);
  t.stddev_us = n > 1 ? std::sqrt(var / (n - 1)) : 0.0;
  return t;
}

// Owns the device, the stream every case runs on, the table and the JSON rows.
class Bench {
 public:
  Bench(const Options& opts, const Cli& cli, Ceiling ceiling, double bus_factor = 1.0)
      : opts_(opts), name_(cli.name()), what_(cli.what()), ceiling_(ceiling), bus_factor_(bus_factor) {
    MOE_CUDA_CHECK(cudaSetDevice(static_cast<int>(opts_.device)));
    MOE_CUDA_CHECK(cudaGetDeviceProperties(&prop_, static_cast<int>(opts_.device)));
    MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    if (opts_.flush_l2) {
      // Twice the L2 so that no line of the previous iteration's data survives the memset.
      flush_bytes_ = 2 * static_cast<size_t>(std::max(prop_.l2CacheSize, 1 << 20));
      MOE_CUDA_CHECK(cudaMalloc(&flush_buf_, flush_bytes_));
    }
    print_header();
  }
  ~Bench() {
    if (flush_buf_) cudaFree(flush_buf_);
    if (stream_) cudaStreamDestroy(stream_);
  }
  Bench(const Bench&) = delete;
  Bench& operator=(const Bench&) = delete;

  cudaStream_t stream() const { return stream_; }
  const Options& options() const { return opts_; }
  const cudaDeviceProp& device_prop() const { return prop_; }

  // Times launch() (which enqueues work on stream()) with a pair of CUDA events per iteration.
  // With flush_l2, a memset larger than L2 runs before each iteration, outside the events: our
  // inputs are often smaller than the 50 MB L2, and a warm L2 would report bandwidth the HBM
  // ceiling cannot explain.
  template <class F>
  Timing time(F&& launch) {
    for (int64_t i = 0; i < opts_.warmup; ++i) launch();
    MOE_CUDA_CHECK(cudaGetLastError());
    std::vector<cudaEvent_t> events(2 * opts_.iters);
    for (cudaEvent_t& e : events) MOE_CUDA_CHECK(cudaEventCreate(&e));
    for (int64_t i = 0; i < opts_.iters; ++i) {
      if (flush_buf_) MOE_CUDA_CHECK(cudaMemsetAsync(flush_buf_, static_cast<int>(i & 0xff), flush_bytes_, stream_));
      MOE_CUDA_CHECK(cudaEventRecord(events[2 * i], stream_));
      launch();
      MOE_CUDA_CHECK(cudaEventRecord(events[2 * i + 1], stream_));
    }
    MOE_CUDA_CHECK(cudaGetLastError());
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::vector<double> us(opts_.iters);
    for (int64_t i = 0; i < opts_.iters; ++i) {
      float ms = 0;
      MOE_CUDA_CHECK(cudaEventElapsedTime(&ms, events[2 * i], events[2 * i + 1]));
      us[i] = 1e3 * ms;
    }
    for (cudaEvent_t e : events) cudaEventDestroy(e);
    return summarize(std::move(us));
  }

  // One case. bytes: bytes read + written by the stage (the copy ceiling counts both); flops:
  // floating-point operations (0 when not a GEMM); wrong: mismatching elements, -1 if unchecked.
  void row(const std::string& shape, const Timing& t, double bytes, double flops, int64_t wrong) {
    Row r{shape, t, bytes, flops, opts_.check ? wrong : -1};
    const double s = t.median_us * 1e-6;
    r.algbw = s > 0 ? bytes / s / 1e9 : 0;
    r.tflops = s > 0 ? flops / s / 1e12 : 0;
    r.frac = ceiling_ == Ceiling::kCopy ? r.algbw / opts_.ceil_bw_gbps : r.tflops / opts_.ceil_tflops;
    std::printf("%32s %9.2f %8.2f %10.1f %10.1f %9.1f %7.1f %9s\n", shape.c_str(), t.median_us, t.stddev_us,
                r.algbw, r.algbw * bus_factor_, r.tflops, 100 * r.frac,
                r.wrong < 0 ? "N/A" : std::to_string(r.wrong).c_str());
    std::fflush(stdout);
    rows_.push_back(r);
  }

  // Prints the footer and writes the JSON. Returns the process exit status: 1 if any case had
  // wrong elements, so scripts can run benchmarks as checks.
  int finish() {
    double avg_us = 0, avg_bw = 0, avg_frac = 0;
    int64_t wrong = 0;
    const double n = rows_.empty() ? 1.0 : static_cast<double>(rows_.size());
    for (const Row& r : rows_) {
      avg_us += r.t.median_us / n, avg_bw += r.algbw / n, avg_frac += r.frac / n;
      wrong += std::max<int64_t>(r.wrong, 0);
    }
    std::printf("# cases: %zu, wrong elements: %s\n", rows_.size(),
                opts_.check ? std::to_string(wrong).c_str() : "not checked");
    std::printf("# avg time: %.2f us, avg algbw: %.1f GB/s, avg busbw: %.1f GB/s, avg %%ceil: %.1f\n", avg_us,
                avg_bw, avg_bw * bus_factor_, 100 * avg_frac);
    if (!opts_.json_path.empty()) write_json(avg_us, avg_bw, avg_frac, wrong);
    return wrong > 0 ? 1 : 0;
  }

 private:
  struct Row {
    std::string shape;
    Timing t;
    double bytes, flops;
    int64_t wrong;
    double algbw = 0, tflops = 0, frac = 0;
  };

  void print_header() const {
    std::printf("# %s: %s\n# command: %s\n", name_.c_str(), what_.c_str(), opts_.command_line.c_str());
    std::printf("# device %lld: %s, sm_%d%d, %d SMs, L2 %d MB, %.0f GB\n", static_cast<long long>(opts_.device),
                prop_.name, prop_.major, prop_.minor, prop_.multiProcessorCount, prop_.l2CacheSize >> 20,
                prop_.totalGlobalMem / 1e9);
    std::printf("# dtype %s, %lld warm-up + %lld timed iterations per case, L2 %s, check %s\n",
                dtype_name(opts_.dtype), static_cast<long long>(opts_.warmup), static_cast<long long>(opts_.iters),
                opts_.flush_l2 ? "flushed before each iteration" : "warm", opts_.check ? "on" : "off");
    if (ceiling_ == Ceiling::kCopy)
      std::printf("# %%ceil: algbw (bytes read + written) / %.0f GB/s copy ceiling\n", opts_.ceil_bw_gbps);
    else
      std::printf("# %%ceil: TFLOP/s / %.0f TFLOP/s bf16 matmul ceiling\n", opts_.ceil_tflops);
    if (std::strstr(prop_.name, "H100") == nullptr)
      std::printf("# NOTE: the default ceilings were measured on an H100; pass --ceil_bw/--ceil_tflops\n");
    std::printf("#\n#%31s %9s %8s %10s %10s %9s %7s %9s\n", "shape", "time", "sd", "algbw", "busbw", "TFLOP/s",
                "%ceil", "#wrong");
    std::printf("#%31s %9s %8s %10s %10s %9s %7s %9s\n", "", "(us)", "(us)", "(GB/s)", "(GB/s)", "", "(%)", "");
  }

  static std::string json_string(const std::string& s) {
    std::string out = "\"";
    for (char c : s) {
      if (c == '"' || c == '\\') out += '\\', out += c;
      else if (static_cast<unsigned char>(c) < 0x20) {
        char buf[8];
        std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(c));
        out += buf;
      }
      else out += c;
    }
    return out + "\"";
  }

  void write_json(double avg_us, double avg_bw, double avg_frac, int64_t wrong) const {
    FILE* f = std::fopen(opts_.json_path.c_str(), "w");
    if (f == nullptr) throw std::runtime_error("cannot write " + opts_.json_path);
    std::fprintf(f, "{\n  \"benchmark\": %s,\n  \"what\": %s,\n  \"command\": %s,\n", json_string(name_).c_str(),
                 json_string(what_).c_str(), json_string(opts_.command_line).c_str());
    std::fprintf(f, "  \"device\": %s,\n  \"sm_count\": %d,\n  \"dtype\": \"%s\",\n  \"iters\": %lld,\n",
                 json_string(prop_.name).c_str(), prop_.multiProcessorCount, dtype_name(opts_.dtype),
                 static_cast<long long>(opts_.iters));
    std::fprintf(f, "  \"warmup\": %lld,\n  \"flush_l2\": %s,\n  \"check\": %s,\n", static_cast<long long>(opts_.warmup),
                 opts_.flush_l2 ? "true" : "false", opts_.check ? "true" : "false");
    std::fprintf(f, "  \"ceiling\": {\"kind\": \"%s\", \"value\": %.6g, \"unit\": \"%s\"},\n  \"bus_factor\": %.6g,\n",
                 ceiling_ == Ceiling::kCopy ? "copy" : "bf16_matmul",
                 ceiling_ == Ceiling::kCopy ? opts_.ceil_bw_gbps : opts_.ceil_tflops,
                 ceiling_ == Ceiling::kCopy ? "GB/s" : "TFLOP/s", bus_factor_);
    std::fprintf(f, "  \"rows\": [");
    for (size_t i = 0; i < rows_.size(); ++i) {
      const Row& r = rows_[i];
      std::fprintf(f,
                   "%s\n    {\"shape\": %s, \"time_us\": %.4f, \"stddev_us\": %.4f, \"min_us\": %.4f, "
                   "\"bytes\": %.17g, \"flops\": %.17g, \"algbw_gbps\": %.4f, \"busbw_gbps\": %.4f, "
                   "\"tflops\": %.4f, \"frac_ceiling\": %.6f, \"wrong\": %s}",
                   i ? "," : "", json_string(r.shape).c_str(), r.t.median_us, r.t.stddev_us, r.t.min_us, r.bytes,
                   r.flops, r.algbw, r.algbw * bus_factor_, r.tflops, r.frac,
                   r.wrong < 0 ? "null" : std::to_string(r.wrong).c_str());
    }
    std::fprintf(f, "\n  ],\n  \"avg\": {\"time_us\": %.4f, \"algbw_gbps\": %.4f, \"frac_ceiling\": %.6f},\n",
                 avg_us, avg_bw, avg_frac);
    std::fprintf(f, "  \"wrong\": %s\n}\n", opts_.check ? std::to_string(wrong).c_str() : "null");
    std::fclose(f);
  }

  Options opts_;
  std::string name_, what_;
  Ceiling ceiling_;
  double bus_factor_;
  cudaDeviceProp prop_{};
  cudaStream_t stream_ = nullptr;
  void* flush_buf_ = nullptr;
  size_t flush_bytes_ = 0;
  std::vector<Row> rows_;
};

// Runs a benchmark body; an exception (a failed MOE_CUDA_CHECK, a bad allocation) becomes a
// one-line message and exit status 2, distinct from 1 = wrong results.
template <class F>
int guarded_main(F&& body) {
  try {
    return body();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "# error: %s\n", e.what());
    return 2;
  }
}

// Device memory that frees itself, so an early throw does not leak across cases.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : n_(n) {
    if (n) MOE_CUDA_CHECK(cudaMalloc(&ptr_, n * sizeof(T)));
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_), std::swap(n_, o.n_);
    return *this;
  }
  T* get() const { return ptr_; }
  size_t size() const { return n_; }
  std::vector<T> to_host() const {
    std::vector<T> h(n_);
    if (n_) MOE_CUDA_CHECK(cudaMemcpy(h.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  void from_host(const std::vector<T>& h) {
    MOE_HOST_ASSERT(h.size() == n_, "DeviceBuffer::from_host: size mismatch");
    if (n_) {
      MOE_CUDA_CHECK(cudaMemcpy(ptr_, h.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
      // NOTE: a pageable host-to-device cudaMemcpy may return before its DMA has landed (CUDA's
      // "API synchronization behavior"), and it runs on the default stream, which Bench's
      // cudaStreamNonBlocking stream does not wait for: a kernel launched next on bench.stream()
      // could read stale inputs (idx, counts, bias). Waiting on that same default stream here
      // adds no dependency the copy itself did not already have.
      MOE_CUDA_CHECK(cudaStreamSynchronize(nullptr));
    }
  }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

// Deterministic inputs: a counter-based hash of (seed, index), so a case is reproducible and the
// host can regenerate any element for its reference without copying the input back.
__host__ __device__ inline float uniform_at(uint64_t seed, uint64_t i, float lo, float hi) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + i + 1;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return lo + (hi - lo) * static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
}

template <class T>
__host__ __device__ inline T from_float(float v) { return static_cast<T>(v); }
template <>
__host__ __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__host__ __device__ inline __half from_float<__half>(float v) { return __float2half(v); }

template <class T>
__host__ __device__ inline float to_float(T v) { return static_cast<float>(v); }
template <>
__host__ __device__ inline float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__host__ __device__ inline float to_float<__half>(__half v) { return __half2float(v); }

template <class T>
inline double to_double(T v) { return static_cast<double>(v); }
template <>
inline double to_double<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
inline double to_double<__half>(__half v) { return __half2float(v); }

template <class T>
__global__ void fill_uniform_kernel(T* out, size_t n, float lo, float hi, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(uniform_at(seed, i, lo, hi));
}

template <class T>
void fill_uniform(T* out, size_t n, float lo, float hi, uint64_t seed, cudaStream_t stream) {
  if (n == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<size_t>((n + 255) / 256, 65536));
  fill_uniform_kernel<T><<<blocks, 256, 0, stream>>>(out, n, lo, hi, seed);
  MOE_CUDA_CHECK(cudaGetLastError());
}

// Elements where |got - want| > atol + rtol * |want| (NaN in either counts as wrong): the
// '#wrong' of a floating-point output. Integer outputs compare with operator== instead.
template <class T, class U>
int64_t count_wrong(const std::vector<T>& got, const std::vector<U>& want, double atol, double rtol) {
  if (got.size() != want.size()) return static_cast<int64_t>(std::max(got.size(), want.size()));
  int64_t wrong = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = to_double(got[i]), w = to_double(want[i]);
    wrong += !(std::fabs(g - w) <= atol + rtol * std::fabs(w));
  }
  return wrong;
}

}  // namespace moe_bench
