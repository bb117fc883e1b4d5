// tnonnx custom operators for ONNX Runtime.
//
// One operator, ai.tnonnx::ContractionChain (version 1), runs a whole factorised dense
// layer x[..., N] -> y[..., M] (a tnonnx.emit.Chain: TT, NTT, SVD, TR, ...) in one node.
// It interprets the plan of tnonnx.emit.run_chain, step by step and in the same order: for
// every step the state (one row per batch element) is transposed so that its logical axes
// read keep + free + contracted, viewed as ([K,] F, C), and multiplied by the step's core
// laid out as ([K,] C, N); the activation follows every step except the last; a final
// transpose puts the output modes in order. Sums accumulate in float32.
//
// How it runs:
// - Rows (batch elements) are independent: they are split into blocks whose widest step
//   (input + output state) fits in about TNONNX_BLOCK floats (L2), and each block goes
//   through every step before the next block starts, so intermediate states stay in cache.
// - The transposes are never materialised. A step's matmul reads the state in place
//   through offset tables (the keep, free and contracted offsets of an element add up), so
//   each step reads the previous step's output and writes its own once, into one of two
//   scratch buffers per thread (sized for a block) that are reused across calls.
// - Constant cores are packed once, when the session loads, into column panels (C x 16
//   contiguous); a register-tiled kernel multiplies a block of rows by a panel.
// - The kernels are compiled for the build's baseline and, on x86-64, also for AVX2+FMA and
//   AVX-512 (tnonnx_kernels.h); the best the CPU has is picked at load time.
// - Blocks are spread over ONNX Runtime's intra-op thread pool; when the rows make a single
//   block, large steps are split over it instead.
//
// Inputs : x (float32, rank >= 1, last axis in_features), then one core per step, float32,
//          shape (C, N) or (K, C, N): the MatMul right operand (tnonnx.emit.core_matrix_np).
// Output : y (float32), x's shape with the last axis replaced by out_features.
// Attributes (ints unless said otherwise; per-step lists are concatenated in step order):
//   activation   string: none | relu | tanh | sigmoid | gelu (erf form), after every step
//                but the last
//   in_features, out_features
//   ranks        per step: number of logical axes of the state before the step
//   dims         per step: the sizes of those axes, in memory order
//   perms        per step: the permutation bringing them to keep + free + contracted order
//   splits       per step: 3 ints, the number of keep, free and contracted axes
//   new_sizes    per step: N, the product of the core's new axes
//   out_dims     the logical axes of the final state (keep + free + new of the last step)
//   out_perm     the permutation bringing them to the output's mode order
//
// Build (see README.md; `tnonnx build-ops` does it), no linking against onnxruntime:
//   g++ -std=c++17 -O3 -shared -fPIC -fno-trapping-math -fno-math-errno -ffp-contract=fast
//       -I<onnxruntime headers> tnonnx_ops.cc -o libtnonnx_ops.so
// Needs GCC >= 9 or Clang >= 9 (vector extensions).

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of always-inlined helpers only
#endif

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(_WIN32)
#define TN_EXPORT __declspec(dllexport)
#else
#define TN_EXPORT __attribute__((visibility("default")))
#endif

#if !defined(__GNUC__) && !defined(__clang__)
#error "tnonnx_ops.cc needs GCC or Clang (vector extensions)"
#endif

// x86-64 without AVX2 in the baseline: also compile the kernels for AVX2+FMA and pick at
// run time, so a portable build still runs at full width where the CPU allows it.
#if defined(__x86_64__) && !defined(__AVX2__) && !defined(TNONNX_NO_DISPATCH)
#define TNONNX_DISPATCH 1
#else
#define TNONNX_DISPATCH 0
#endif
#ifndef TNONNX_AVX512_ROWS
#define TNONNX_AVX512_ROWS 8
#endif
#ifndef TNONNX_CHUNK
#define TNONNX_CHUNK 4096  // floats of state a chunk of register-tile rows reads in one step (L1)
#endif
#ifndef TNONNX_BLOCK
#define TNONNX_BLOCK 32768  // floats of state (a step's input + output) a block of rows holds (L2)
#endif

namespace tnonnx {

constexpr const char* kDomain = "ai.tnonnx";
constexpr const char* kOpType = "ContractionChain";

typedef float v4f __attribute__((vector_size(16)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));

// the activation after every step but the last
enum class Act { None, Relu, Tanh, Sigmoid, Gelu };

// ------------------------------------------------------------------ the plan

struct Step {
  int64_t K = 1, F = 1, C = 1, N = 1;
  int64_t in_size = 0;   // state elements per batch row before the step
  int64_t out_size = 0;  // K * F * N
  std::vector<int64_t> off_k, off_f;  // state offsets of the keep and free indices
  // the contracted index c is at state offset run_start[c / c_run] + c % c_run (c_run: the
  // longest run of contracted axes contiguous in memory); run_start ends with a sentinel 0
  int64_t c_run = 1;
  std::vector<int64_t> run_start;
};

struct Plan {
  int64_t in_features = 0, out_features = 0;
  Act act = Act::None;
  std::vector<Step> steps;
  bool final_identity = true;
  std::vector<int64_t> final_src;  // output element j of a row <- state element final_src[j]
  int64_t max_state = 0;           // largest intermediate state per row
  int64_t widest = 0;              // largest input + output state of one step, per row
  int64_t macs = 0;                // multiply-adds per row
};

[[noreturn]] void fail(const std::string& what) {
  throw std::runtime_error(std::string(kOpType) + ": " + what);
}

int64_t product(const int64_t* d, size_t n) {
  int64_t p = 1;
  for (size_t i = 0; i < n; ++i) p *= d[i];
  return p;
}

std::vector<int64_t> strides_of(const std::vector<int64_t>& dims) {
  std::vector<int64_t> s(dims.size(), 1);
  for (size_t i = dims.size(); i-- > 1;) s[i - 1] = s[i] * dims[i];
  return s;
}

// Offsets (row-major over `axes`, the last one fastest) of every index of the sub-block
// spanned by `axes` of a tensor with `dims` / `strides`.
std::vector<int64_t> offsets(const std::vector<int64_t>& dims, const std::vector<int64_t>& strides,
                             const int64_t* axes, size_t n) {
  std::vector<int64_t> out(1, 0);
  for (size_t j = 0; j < n; ++j) {
    const int64_t d = dims[axes[j]], s = strides[axes[j]];
    std::vector<int64_t> next;
    next.reserve(out.size() * d);
    for (int64_t o : out)
      for (int64_t i = 0; i < d; ++i) next.push_back(o + i * s);
    out.swap(next);
  }
  return out;
}

void check_perm(const int64_t* perm, size_t n, const char* what) {
  std::vector<char> seen(n, 0);
  for (size_t i = 0; i < n; ++i) {
    if (perm[i] < 0 || perm[i] >= static_cast<int64_t>(n) || seen[perm[i]])
      fail(std::string(what) + " is not a permutation");
    seen[perm[i]] = 1;
  }
}

Act parse_activation(const std::string& name) {
  if (name.empty() || name == "none") return Act::None;
  if (name == "relu") return Act::Relu;
  if (name == "tanh") return Act::Tanh;
  if (name == "sigmoid") return Act::Sigmoid;
  if (name == "gelu") return Act::Gelu;
  fail("unknown activation '" + name + "' (expected none, relu, tanh, sigmoid or gelu)");
}

Plan make_plan(const Ort::ConstKernelInfo& info) {
  Plan plan;
  plan.act = parse_activation(info.GetAttribute<std::string>("activation"));
  plan.in_features = info.GetAttribute<int64_t>("in_features");
  plan.out_features = info.GetAttribute<int64_t>("out_features");
  const auto ranks = info.GetAttributes<int64_t>("ranks");
  const auto dims = info.GetAttributes<int64_t>("dims");
  const auto perms = info.GetAttributes<int64_t>("perms");
  const auto splits = info.GetAttributes<int64_t>("splits");
  const auto news = info.GetAttributes<int64_t>("new_sizes");
  const auto out_dims = info.GetAttributes<int64_t>("out_dims");
  const auto out_perm = info.GetAttributes<int64_t>("out_perm");
  const size_t n_steps = ranks.size();
  if (n_steps == 0) fail("no steps");
  if (splits.size() != 3 * n_steps || news.size() != n_steps)
    fail("splits/new_sizes do not match the number of steps");
  size_t total = 0;
  for (int64_t r : ranks) {
    if (r < 0) fail("negative rank");
    total += static_cast<size_t>(r);
  }
  if (dims.size() != total || perms.size() != total) fail("dims/perms do not match ranks");
  for (int64_t d : dims)
    if (d < 1) fail("dims must be positive");

  int64_t state = plan.in_features;  // elements per row of the current state
  size_t at = 0;
  for (size_t i = 0; i < n_steps; ++i) {
    const size_t r = static_cast<size_t>(ranks[i]);
    std::vector<int64_t> d(dims.begin() + at, dims.begin() + at + r);
    const int64_t* perm = perms.data() + at;
    check_perm(perm, r, "perms");
    const int64_t nk = splits[3 * i], nf = splits[3 * i + 1], nc = splits[3 * i + 2];
    if (nk < 0 || nf < 0 || nc < 0 || static_cast<size_t>(nk + nf + nc) != r)
      fail("splits do not add up to the rank of step " + std::to_string(i));
    if (product(d.data(), r) != state)
      fail("step " + std::to_string(i) + " dims do not match the state size " + std::to_string(state));
    Step s;
    const auto st = strides_of(d);
    s.off_k = offsets(d, st, perm, nk);
    s.off_f = offsets(d, st, perm + nk, nf);
    const auto off_c = offsets(d, st, perm + nk + nf, nc);
    s.K = static_cast<int64_t>(s.off_k.size());
    s.F = static_cast<int64_t>(s.off_f.size());
    s.C = static_cast<int64_t>(off_c.size());
    s.N = news[i];
    for (int64_t j = nk + nf + nc; j-- > nk + nf && st[perm[j]] == s.c_run;) s.c_run *= d[perm[j]];
    for (int64_t c = 0; c < s.C; c += s.c_run) s.run_start.push_back(off_c[c]);
    s.run_start.push_back(0);
    if (s.N < 1) fail("new_sizes must be positive");
    s.in_size = state;
    s.out_size = s.K * s.F * s.N;
    plan.widest = std::max(plan.widest, s.in_size + s.out_size);
    plan.macs += s.K * s.F * s.C * s.N;
    state = s.out_size;
    if (i + 1 < n_steps) plan.max_state = std::max(plan.max_state, state);
    plan.steps.push_back(std::move(s));
    at += r;
  }
  const size_t r = out_dims.size();
  if (out_perm.size() != r) fail("out_dims/out_perm differ in length");
  check_perm(out_perm.data(), r, "out_perm");
  for (int64_t d : out_dims)
    if (d < 1) fail("out_dims must be positive");
  if (product(out_dims.data(), r) != state) fail("out_dims do not match the last step's output");
  if (state != plan.out_features) fail("out_features does not match the last step's output");
  for (size_t i = 0; i < r; ++i) plan.final_identity = plan.final_identity && out_perm[i] == static_cast<int64_t>(i);
  if (!plan.final_identity) {
    plan.final_src = offsets(out_dims, strides_of(out_dims), out_perm.data(), r);
    plan.max_state = std::max(plan.max_state, state);
  }
  return plan;
}

// ------------------------------------------------------------------ one step
//
// A step is out[(b, k, f), :] = A[(b, k, f), :] @ W[k], A the transposed state, read in
// place. The core W[k] (C x N) is packed into panels of 16 (or, for N <= 8, 8 or 4)
// columns, each panel C x width contiguous and zero-padded past N. Output rows (b, f)
// sharing k form blocks of TN_ROWS rows; a register tile is one block times one or two
// panels.

constexpr int kPanel = 16;

// Panel width of a step: 16 columns, narrower for the few-column steps that end a chain.
int64_t panel_width(int64_t n) { return n <= 4 ? 4 : n <= 8 ? 8 : kPanel; }
int64_t panels_of(int64_t n) { return (n + panel_width(n) - 1) / panel_width(n); }
int64_t packed_size(const Step& s) { return s.K * panels_of(s.N) * s.C * panel_width(s.N); }

// W (K, C, N) -> (K, panels, C, panel width), zero-padded past N
void pack_core(const float* w, int64_t K, int64_t C, int64_t N, float* dst) {
  const int64_t P = panels_of(N), pw = panel_width(N);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t p = 0; p < P; ++p)
      for (int64_t c = 0; c < C; ++c) {
        const float* src = w + (k * C + c) * N + p * pw;
        const int64_t valid = std::min<int64_t>(pw, N - p * pw);
        for (int64_t j = 0; j < pw; ++j) *dst++ = j < valid ? src[j] : 0.0f;
      }
}

struct StepRun {
  const Step* s;
  const float* in;      // state before the step, in_size floats per batch row
  float* out;           // (B, K, F, N)
  const float* packed;  // the core, packed by pack_core
  int64_t B;
  int64_t blocks;       // row blocks per k: ceil(B * F / TN_ROWS)
  Act act;              // None on the last step
};

// ------------------------------------------------------------------ instruction sets
// The kernels (tnonnx_kernels.h) are compiled for the build's baseline and, on x86-64, also
// for AVX2+FMA and AVX-512; the best one the CPU supports is picked when the library loads
// (TNONNX_ISA=avx2 or TNONNX_ISA=baseline in the environment asks for a lesser one). A
// register tile holds TN_ROWS rows x TN_PANELS panels of accumulators.

namespace base {
#define TN_TARGET
#if defined(__AVX512F__)
#define TN_VEC v16f
#define TN_ROWS 8
#define TN_PANELS 2
#elif defined(__AVX__) || defined(__aarch64__)
#define TN_VEC v8f
#define TN_ROWS 6
#define TN_PANELS 1
#else
#define TN_VEC v4f
#define TN_ROWS 3
#define TN_PANELS 1
#endif
#include "tnonnx_kernels.h"
constexpr int kRows = TN_ROWS;
#undef TN_TARGET
#undef TN_VEC
#undef TN_ROWS
#undef TN_PANELS
}  // namespace base

#if TNONNX_DISPATCH
namespace avx2 {
#define TN_TARGET __attribute__((target("avx2,fma")))
#define TN_VEC v8f
#define TN_ROWS 6
#define TN_PANELS 1
#include "tnonnx_kernels.h"
#undef TN_TARGET
#undef TN_VEC
#undef TN_ROWS
#undef TN_PANELS
}  // namespace avx2

namespace avx512 {
#define TN_TARGET __attribute__((target("avx512f,fma")))
#define TN_VEC v16f
#define TN_ROWS TNONNX_AVX512_ROWS
#define TN_PANELS 2
#include "tnonnx_kernels.h"
#undef TN_TARGET
#undef TN_VEC
#undef TN_ROWS
#undef TN_PANELS
}  // namespace avx512
#endif

struct Isa {
  void (*run)(const StepRun&, int64_t, int64_t, int64_t, int64_t);
  int rows;
  const char* name;
};

Isa pick_isa() {
#if TNONNX_DISPATCH
  const char* env = std::getenv("TNONNX_ISA");
  const std::string wanted = env ? env : "";
  __builtin_cpu_init();
  if (wanted != "avx2" && wanted != "baseline" && __builtin_cpu_supports("avx512f"))
    return {avx512::run_task, TNONNX_AVX512_ROWS, "avx512"};
  if (wanted != "baseline" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return {avx2::run_task, 6, "avx2"};
#endif
  return {base::run_task, base::kRows, "baseline"};
}

const Isa isa = pick_isa();

// Work below this many multiply-adds per task is not worth a thread.
constexpr int64_t kTaskMacs = 1 << 16;
constexpr int64_t kMaxTasks = 64;
// Rows are split into at least this many blocks when there are enough (for the threads).
constexpr int64_t kMinBlocks = 8;

struct Job {
  const StepRun* run;
  int64_t units, panels, row_tasks, panel_tasks;
};

void job_task(void* data, size_t t) {
  const Job& job = *static_cast<const Job*>(data);
  const int64_t r = static_cast<int64_t>(t) / job.panel_tasks, p = static_cast<int64_t>(t) % job.panel_tasks;
  isa.run(*job.run, job.units * r / job.row_tasks, job.units * (r + 1) / job.row_tasks,
          job.panels * p / job.panel_tasks, job.panels * (p + 1) / job.panel_tasks);
}

void run_step(const Ort::KernelContext& ctx, const StepRun& run) {
  const Step& s = *run.s;
  const int64_t units = s.K * run.blocks, panels = panels_of(s.N);
  const int64_t macs = run.B * s.K * s.F * s.C * s.N;
  const int64_t tasks = std::min<int64_t>({kMaxTasks, macs / kTaskMacs, units * panels});
  if (tasks <= 1) {
    isa.run(run, 0, units, 0, panels);
    return;
  }
  // split the row blocks; split the panels too when there are fewer blocks than tasks
  const int64_t row_tasks = std::min(units, tasks);
  const int64_t panel_tasks = std::min(panels, std::max<int64_t>(1, tasks / row_tasks));
  Job job{&run, units, panels, row_tasks, panel_tasks};
  ctx.ParallelFor(job_task, static_cast<size_t>(row_tasks * panel_tasks), 0, &job);
}

// ------------------------------------------------------------------ the kernel

struct Kernel {
  Plan plan;
  std::vector<std::vector<float>> packed;  // per step: the packed core when it is constant

  Kernel(Plan p, const Ort::ConstKernelInfo& info) : plan(std::move(p)), packed(plan.steps.size()) {
    for (size_t i = 0; i < plan.steps.size(); ++i) {
      int is_constant = 0;
      Ort::ConstValue core{nullptr};
      try {
        core = info.GetTensorConstantInput(i + 1, &is_constant);
      } catch (const std::exception&) {
        is_constant = 0;
      }
      if (!is_constant || core == nullptr) continue;
      const Step& s = plan.steps[i];
      check_core(core, i);
      packed[i].resize(static_cast<size_t>(packed_size(s)));
      pack_core(core.GetTensorData<float>(), s.K, s.C, s.N, packed[i].data());
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
  }

  void check_core(const Ort::ConstValue& core, size_t i) const {
    const auto info = core.GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      fail("supports float32 only (core " + std::to_string(i) + ")");
    const auto cs = info.GetShape();
    const Step& s = plan.steps[i];
    const bool ok = (cs.size() == 2 && s.K == 1 && cs[0] == s.C && cs[1] == s.N) ||
                    (cs.size() == 3 && cs[0] == s.K && cs[1] == s.C && cs[2] == s.N);
    if (!ok)
      fail("core " + std::to_string(i) + " must have shape " + (s.K > 1 ? std::to_string(s.K) + "x" : "") +
           std::to_string(s.C) + "x" + std::to_string(s.N));
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t n_steps = plan.steps.size();
    if (ctx.GetInputCount() != n_steps + 1)
      fail("expected x and " + std::to_string(n_steps) + " cores, got " + std::to_string(ctx.GetInputCount()) +
           " inputs");
    Ort::ConstValue x = ctx.GetInput(0);
    const auto x_info = x.GetTensorTypeAndShapeInfo();
    if (x_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) fail("supports float32 only (input x)");
    std::vector<int64_t> shape = x_info.GetShape();
    if (shape.empty()) fail("x must have rank >= 1");
    if (shape.back() != plan.in_features)
      fail("x has " + std::to_string(shape.back()) + " features on its last axis, expected " +
           std::to_string(plan.in_features));
    const int64_t B = product(shape.data(), shape.size() - 1);

    // cores that were not constant at load time are packed on every call
    thread_local std::vector<float> repacked;
    thread_local std::vector<const float*> cores;
    cores.resize(n_steps);
    size_t repack = 0;
    for (size_t i = 0; i < n_steps; ++i) {
      Ort::ConstValue core = ctx.GetInput(i + 1);
      check_core(core, i);
      const Step& s = plan.steps[i];
      if (packed[i].empty()) repack += static_cast<size_t>(packed_size(s));
    }
    if (repacked.size() < repack) repacked.resize(repack);
    for (size_t i = 0, at = 0; i < n_steps; ++i) {
      const Step& s = plan.steps[i];
      if (!packed[i].empty()) {
        cores[i] = packed[i].data();
        continue;
      }
      pack_core(ctx.GetInput(i + 1).GetTensorData<float>(), s.K, s.C, s.N, repacked.data() + at);
      cores[i] = repacked.data() + at;
      at += static_cast<size_t>(packed_size(s));
    }

    shape.back() = plan.out_features;
    Ort::UnownedValue y = ctx.GetOutput(0, shape);
    float* out = y.GetTensorMutableData<float>();
    if (B == 0) return;

    const float* src = x.GetTensorData<float>();
    const int64_t rows = block_rows(B);
    const int64_t n_blocks = (B + rows - 1) / rows;
    if (n_blocks == 1) {  // one block: its steps split over the threads
      run_block(src, out, B, cores.data(), &ctx);
      return;
    }
    // blocks of rows through every step, one block after another in each thread
    const int64_t tasks = std::min<int64_t>(n_blocks, B * plan.macs / kTaskMacs);
    BlockJob job{this, cores.data(), src, out, B, rows};
    if (tasks <= 1) {
      for (int64_t i = 0; i < n_blocks; ++i) block_task(&job, static_cast<size_t>(i));
      return;
    }
    ctx.ParallelFor(block_task, static_cast<size_t>(n_blocks), static_cast<size_t>(tasks), &job);
  }

  // Batch rows per block: as many as keep the widest step's input and output within
  // TNONNX_BLOCK floats (a multiple of the register tile's rows when that is more than
  // one tile), fewer when that gives under kMinBlocks blocks to share among threads, and
  // the B rows spread evenly over the blocks. Depends on B and the plan only, never on the
  // thread count, so neither do the results.
  int64_t block_rows(int64_t B) const {
    const int64_t R = isa.rows;
    int64_t rows = std::max<int64_t>(1, TNONNX_BLOCK / std::max<int64_t>(1, plan.widest));
    if (rows > R) rows -= rows % R;
    if (B >= 2 * R) rows = std::min(rows, std::max<int64_t>(R, (B / kMinBlocks + R - 1) / R * R));
    const int64_t n_blocks = (B + rows - 1) / rows;
    rows = (B + n_blocks - 1) / n_blocks;
    if (rows > R && n_blocks > 1) rows = std::min(B, (rows + R - 1) / R * R);
    return rows;
  }

  struct BlockJob {
    const Kernel* kernel;
    const float* const* cores;
    const float* x;
    float* out;
    int64_t B, rows;
  };

  static void block_task(void* data, size_t i) {
    const BlockJob& job = *static_cast<const BlockJob*>(data);
    const int64_t b0 = static_cast<int64_t>(i) * job.rows, nb = std::min(job.rows, job.B - b0);
    if (nb <= 0) return;
    const Plan& plan = job.kernel->plan;
    job.kernel->run_block(job.x + b0 * plan.in_features, job.out + b0 * plan.out_features, nb, job.cores,
                          nullptr);
  }

  // B rows from src through every step (cores: the packed cores) into out; the steps are split over
  // ctx's threads when ctx is given, run in the calling thread otherwise.
  void run_block(const float* src, float* out, int64_t B, const float* const* cores,
                 const Ort::KernelContext* ctx) const {
    // two scratch buffers per thread, grown on demand and reused across calls
    thread_local std::vector<float> scratch[2];
    const size_t need = static_cast<size_t>(B * plan.max_state);
    for (auto& buf : scratch)
      if (buf.size() < need) buf.resize(need);
    const size_t n_steps = plan.steps.size();
    for (size_t i = 0; i < n_steps; ++i) {
      const Step& s = plan.steps[i];
      const bool last = i + 1 == n_steps;
      float* dst = last && plan.final_identity ? out : scratch[i % 2].data();
      const int64_t blocks = (B * s.F + isa.rows - 1) / isa.rows;
      StepRun run{&s, src, dst, cores[i], B, blocks, last ? Act::None : plan.act};
      if (ctx)
        run_step(*ctx, run);
      else
        isa.run(run, 0, s.K * blocks, 0, panels_of(s.N));
      src = dst;
    }
    if (!plan.final_identity) {  // the final Transpose, as a gather
      const int64_t M = plan.out_features;
      const int64_t* from = plan.final_src.data();
      for (int64_t b = 0; b < B; ++b) {
        const float* row = src + b * M;
        float* o = out + b * M;
        for (int64_t j = 0; j < M; ++j) o[j] = row[from[j]];
      }
    }
  }
};

struct ContractionChainOp : Ort::CustomOpBase<ContractionChainOp, Kernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      const Ort::ConstKernelInfo kernel_info(info);
      *kernel = new Kernel(make_plan(kernel_info), kernel_info);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, (std::string(kOpType) + ": " + e.what()).c_str());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }
  const char* GetName() const { return kOpType; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_VARIADIC;
  }
  int GetVariadicInputMinArity() const { return 1; }
  bool GetVariadicInputHomogeneity() const { return true; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

std::mutex domains_mutex;
std::vector<std::unique_ptr<Ort::CustomOpDomain>> domains;  // must outlive the sessions

}  // namespace tnonnx

extern "C" TN_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                 const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // an older runtime: answer through the oldest API, which every runtime has
    const std::string msg = "the tnonnx custom-op library was built against onnxruntime API version " +
                            std::to_string(ORT_API_VERSION) + ", newer than this onnxruntime (" +
                            api_base->GetVersionString() + ")";
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, msg.c_str());
  }
  Ort::InitApi(api);
  static tnonnx::ContractionChainOp op;
  try {
    auto domain = std::make_unique<Ort::CustomOpDomain>(tnonnx::kDomain);
    domain->Add(&op);
    Ort::UnownedSessionOptions(options).Add(*domain);
    std::lock_guard<std::mutex> lock(tnonnx::domains_mutex);
    tnonnx::domains.push_back(std::move(domain));
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
