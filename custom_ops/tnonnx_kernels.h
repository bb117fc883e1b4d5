// The compute kernels of tnonnx_ops.cc. Included once per instruction set, inside its own
// namespace, with TN_TARGET (a target attribute, or nothing), TN_VEC (the widest vector
// type), TN_ROWS (rows per register tile) and TN_PANELS (16-column panels per register
// tile) defined; no include guard on purpose.
//
// Every function carries TN_TARGET so that the whole call tree is compiled for that
// instruction set (always_inline helpers of another target would not inline, and generic
// vector code would be lowered for the baseline).

#define TN_KFN inline __attribute__((always_inline)) TN_TARGET

// unaligned vector loads and stores (memcpy compiles to one unaligned move)
template <typename V>
TN_KFN V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V>
TN_KFN void store(float* p, const V& v) { std::memcpy(p, &v, sizeof v); }

// ------------------------------------------------------------------ activations
// Branch-free float code the compiler vectorises (with -fno-trapping-math); relative error
// a few float32 ulps (tanh <= 4e-7; gelu through an erfc accurate to 1.2e-7).

TN_KFN float exp_approx(float x) {  // Cephes expf: range reduction + degree-6 polynomial
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f + 0.5f;
  const int i = static_cast<int>(t + 128.0f) - 128;  // floor(t): t + 128 > 0
  const float n = static_cast<float>(i);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int bits = (i + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

TN_KFN float sigmoid_approx(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

TN_KFN float tanh_approx(float x) {  // odd rational minimax approximation (as in Eigen and MLAS)
  x = std::min(std::max(x, -7.90531110763549805f), 7.90531110763549805f);
  const float z = x * x;
  float p = -2.76076847742355e-16f;
  p = p * z + 2.00018790482477e-13f;
  p = p * z - 8.60467152213735e-11f;
  p = p * z + 5.12229709037114e-08f;
  p = p * z + 1.48572235717979e-05f;
  p = p * z + 6.37261928875436e-04f;
  p = p * z + 4.89352455891786e-03f;
  float q = 1.19825839466702e-06f;
  q = q * z + 1.18534705686654e-04f;
  q = q * z + 2.26843463243900e-03f;
  q = q * z + 4.89352518554385e-03f;
  return x * p / q;
}

TN_KFN float gelu_approx(float x) {  // x * Phi(x), Phi through erfc (Numerical Recipes' erfcc)
  const float z = std::fabs(x) * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const float erfc = t * exp_approx(p - z * z);  // erfc(|x| / sqrt 2)
  const float half = 0.5f * x * erfc;
  return x >= 0.0f ? x - half : half;
}

template <Act A>
TN_KFN void activate_row(float* __restrict y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    if constexpr (A == Act::Relu) y[j] = y[j] > 0.0f ? y[j] : 0.0f;
    if constexpr (A == Act::Tanh) y[j] = tanh_approx(y[j]);
    if constexpr (A == Act::Sigmoid) y[j] = sigmoid_approx(y[j]);
    if constexpr (A == Act::Gelu) y[j] = gelu_approx(y[j]);
  }
}

TN_KFN void activate(Act act, float* y, int64_t n) {
  switch (act) {
    case Act::Relu: activate_row<Act::Relu>(y, n); break;
    case Act::Tanh: activate_row<Act::Tanh>(y, n); break;
    case Act::Sigmoid: activate_row<Act::Sigmoid>(y, n); break;
    case Act::Gelu: activate_row<Act::Gelu>(y, n); break;
    case Act::None: break;
  }
}

// all lanes = *p
template <typename V>
TN_KFN V splat(const float* p) {
  const float x = *p;
  if constexpr (sizeof(V) == 64) {
    const V v = {x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
    return v;
  } else if constexpr (sizeof(V) == 32) {
    const V v = {x, x, x, x, x, x, x, x};
    return v;
  } else {
    const V v = {x, x, x, x};
    return v;
  }
}

// The contracted index c of a step reads state offset run_start[c / L] + c % L (L: the
// longest run of contracted axes contiguous in memory). A cursor walks it without divisions.
struct Cursor {
  const int64_t* next;  // the next run's start (the table ends with a sentinel)
  int64_t base, l, L;
  TN_KFN explicit Cursor(const Step& s) : next(s.run_start.data() + 1), base(s.run_start[0]), l(0), L(s.c_run) {}
  TN_KFN int64_t advance() {  // the current offset, then step to the next c
    const int64_t off = base + l;
    if (++l == L) l = 0, base = *next++;
    return off;
  }
};

// RV rows times NP adjacent panels of PW columns, into out[i][n0, n0 + ncols). Row i of the
// transposed state is read in place: a[i] + (offset of c). Few rows split the sum over c
// into U independent accumulators, so FMA latency does not serialise it.
template <typename V, int RV, int NP, int PW>
TN_KFN void micro(const Step& s, const float* const* a, const float* __restrict w, float* const* out, int64_t n0,
                  int64_t ncols) {
  constexpr int W = sizeof(V) / sizeof(float);
  static_assert(PW % W == 0, "a panel holds whole vectors");
  constexpr int NV = NP * PW / W;  // vectors per row
  constexpr int U = std::max(1, std::min(4, 8 / (RV * NV)));
  const int64_t C = s.C, pstride = C * PW;  // from one panel to the next
  V acc[U][RV][NV];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < RV; ++i)
      for (int j = 0; j < NV; ++j) acc[u][i][j] = V{};
  const float* ai[RV];
  for (int i = 0; i < RV; ++i) ai[i] = a[i];
  Cursor cursor(s);
  int64_t c = 0;
  for (; c + U <= C; c += U) {
    for (int u = 0; u < U; ++u) {
      const int64_t off = cursor.advance();
      V wv[NV];
      for (int j = 0; j < NV; ++j) wv[j] = load<V>(w + (j * W / PW) * pstride + (c + u) * PW + (j * W) % PW);
      for (int i = 0; i < RV; ++i) {
        const V x = splat<V>(ai[i] + off);
        for (int j = 0; j < NV; ++j) acc[u][i][j] += x * wv[j];
      }
    }
  }
  for (; c < C; ++c) {
    const int64_t off = cursor.advance();
    V wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = load<V>(w + (j * W / PW) * pstride + c * PW + (j * W) % PW);
    for (int i = 0; i < RV; ++i) {
      const V x = splat<V>(ai[i] + off);
      for (int j = 0; j < NV; ++j) acc[0][i][j] += x * wv[j];
    }
  }
  for (int u = 1; u < U; ++u)
    for (int i = 0; i < RV; ++i)
      for (int j = 0; j < NV; ++j) acc[0][i][j] += acc[u][i][j];
  for (int i = 0; i < RV; ++i) {
    float* o = out[i] + n0;
    if (ncols == NP * PW) {
      for (int j = 0; j < NV; ++j) store<V>(o + j * W, acc[0][i][j]);
    } else {
      float tmp[NP * PW];
      for (int j = 0; j < NV; ++j) store<V>(tmp + j * W, acc[0][i][j]);
      for (int64_t j = 0; j < ncols; ++j) o[j] = tmp[j];
    }
  }
}

// a block of `rows` <= RV rows times NP panels (one instantiation per row count)
template <typename V, int RV, int NP, int PW>
TN_KFN void block_times_panels(int rows, const Step& s, const float* const* a, const float* w, float* const* out,
                               int64_t n0, int64_t ncols) {
  if (rows == RV) {
    micro<V, RV, NP, PW>(s, a, w, out, n0, ncols);
  } else if constexpr (RV > 1) {
    block_times_panels<V, RV - 1, NP, PW>(rows, s, a, w, out, n0, ncols);
  }
}

// the widest of the vector types that fits a panel of PW columns
template <int PW>
using VecFor = std::conditional_t<(sizeof(TN_VEC) / sizeof(float) <= PW), TN_VEC,
                                  std::conditional_t<(PW >= 8), v8f, v4f>>;

// The row blocks of a task (their k, rows, first rows and outputs set up) times panels [p0, p1).
template <int PW, int NP>
TN_KFN void blocks_times_panels(const StepRun& run, int64_t n_units, const int64_t* ks, const int* rows,
                                const float* const* a_rows, float* const* out_rows, int64_t p0, int64_t p1) {
  using V = VecFor<PW>;
  constexpr int R = TN_ROWS;
  const Step& s = *run.s;
  const int64_t C = s.C, N = s.N, P = panels_of(N);
  // row blocks in chunks that stay in cache while the core's panels go past them
  const int64_t chunk = std::max<int64_t>(1, TNONNX_CHUNK / (C * R));
  for (int64_t v0 = 0; v0 < n_units; v0 += chunk) {
    const int64_t v1 = std::min(n_units, v0 + chunk);
    for (int64_t p = p0; p < p1; p += NP) {
      const int64_t n0 = p * PW, ncols = std::min<int64_t>(NP * PW, N - n0);
      const bool whole = NP == 1 || p + NP <= p1;
      for (int64_t v = v0; v < v1; ++v) {
        const float* w = run.packed + (ks[v] * P + p) * C * PW;
        const float* const* a = a_rows + v * R;
        float* const* out = out_rows + v * R;
        if (whole)
          block_times_panels<V, R, NP, PW>(rows[v], s, a, w, out, n0, ncols);
        else
          block_times_panels<V, R, 1, PW>(rows[v], s, a, w, out, n0, std::min<int64_t>(PW, ncols));
      }
    }
    if (run.act != Act::None) {  // on the chunk's finished rows, while they are in cache
      const int64_t n0 = p0 * PW, n1 = std::min(N, p1 * PW);
      for (int64_t v = v0; v < v1; ++v)
        for (int i = 0; i < rows[v]; ++i) activate(run.act, out_rows[v * R + i] + n0, n1 - n0);
    }
  }
}

// Row blocks [u0, u1) (u = k * blocks + block; a block is TN_ROWS rows (b, f) sharing k)
// times panels [p0, p1).
TN_TARGET void run_task(const StepRun& run, int64_t u0, int64_t u1, int64_t p0, int64_t p1) {
  constexpr int R = TN_ROWS;
  const Step& s = *run.s;
  const int64_t N = s.N, rows_total = run.B * s.F, n_units = u1 - u0;
  // per row: where it starts in the state (the keep and free offsets), where its output goes;
  // per block: its k. Walked incrementally (no divisions per block: the steps of a chain
  // with few contracted indices do about as little work per block as a division costs).
  thread_local std::vector<const float*> a_rows;
  thread_local std::vector<float*> out_rows;
  thread_local std::vector<int> rows;
  thread_local std::vector<int64_t> ks;
  if (a_rows.size() < static_cast<size_t>(n_units * R)) {
    a_rows.resize(n_units * R);
    out_rows.resize(n_units * R);
    rows.resize(n_units);
    ks.resize(n_units);
  }
  int64_t k = u0 / run.blocks, q0 = (u0 % run.blocks) * R;
  int64_t b = q0 / s.F, f = q0 % s.F;
  for (int64_t v = 0; v < n_units; ++v) {
    const int n = static_cast<int>(std::min<int64_t>(R, rows_total - q0));
    rows[v] = n;
    ks[v] = k;
    const float* a = run.in + s.off_k[k];
    float* o = run.out + k * s.F * N;
    const float** ar = a_rows.data() + v * R;
    float** orow = out_rows.data() + v * R;
    for (int i = 0; i < n; ++i) {
      ar[i] = a + b * s.in_size + s.off_f[f];
      orow[i] = o + (b * s.K * s.F + f) * N;
      if (++f == s.F) f = 0, ++b;
    }
    q0 += R;
    if (q0 >= rows_total) q0 = 0, b = 0, f = 0, ++k;
  }
  switch (panel_width(N)) {
    case 4: blocks_times_panels<4, 1>(run, n_units, ks.data(), rows.data(), a_rows.data(), out_rows.data(), p0, p1); break;
    case 8: blocks_times_panels<8, 1>(run, n_units, ks.data(), rows.data(), a_rows.data(), out_rows.data(), p0, p1); break;
    default:
      blocks_times_panels<kPanel, TN_PANELS>(run, n_units, ks.data(), rows.data(), a_rows.data(), out_rows.data(), p0,
                                             p1);
  }
}

#undef TN_KFN
