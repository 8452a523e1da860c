// The recurrence on the CPU: the same two entry points as the Triton backend, for each cell of
// fused_rnn/cells.py (`cell`: "course", or nn.RNN's own "elman_tanh" / "elman_relu"). A cell is a
// struct with its pointwise step forward and backward (below the row kernels); one time loop
// forward and one backward take it as a template parameter.
//
//   rnn_fwd(proj, ids, w_h, b_h, h0, cell, w_in, b_in) -> out [T, B, H]: out[t] = h_{t+1} (time-major; h0 None: zeros)
//       course: h_t = tanh((h_{t-1} + relu(p_t)) @ W_h^T + b_h), p_t = proj[ids[:, t]] (token input)
//               or proj[:, t] (dense input, proj [B, T, H]).
//       elman:  h_t = act(h_{t-1} @ W_h^T + q_t), act = tanh or relu, q_t = proj[t] (proj [T, B, H],
//               time-major, both biases already in it; no ids, no b_h).
//   rnn_bwd(grad_out [B, T, H], grad_h_n, out, h0, proj, ids, w_h, has_bias, cell, w_in, b_in)
//       -> (grad_proj, grad_w_h, grad_b_h, grad_h0): the chain c_t = dz_t @ W_h with
//       dz_t = (grad_out[:, t] + c_{t+1}) * act'(h_t), c_T = grad_h_n (None: zeros), run per step
//       (act' = 1 - h^2 for tanh, h > 0 for relu); then grad_h0 = c_0 (None without h0) and
//       course: grad_w_h = sum_t dz_t^T (h_{t-1} + relu(p_t)), grad_b_h = sum dz_t,
//               grad_p_t = c_t * (p_t > 0) (summed into rows of proj for token input);
//       elman:  grad_w_h = sum_t dz_t^T h_{t-1}, grad_proj = dz ([T, B, H], like proj), no grad_b_h.
//   The elman cells also take w_in: proj is then the dense input x [B, T, I] and b_h the bias of
//   q = x W_in^T + b_h, formed inside the time loop; rnn_bwd adds grad_w_in and returns dL/dx as
//   grad_proj ("The input projection inside the recurrence", below). The course cell with token ids
//   takes w_in and b_in instead: proj is then the embedding E [V, E] and the [V, H] table
//   U = E W_in^T + b_in is formed inside; rnn_bwd returns dL/dE as grad_proj, then grad_w_in and
//   grad_b_in ("The course's token projection inside the recurrence", below). rnn_bwd returns six
//   entries either way, None where there is no such input.
//
// The states are time-major: each step's are one contiguous [B, H] block, so every GEMM writes
// its output in place, and the backward's weight gradient reads a chunk of steps' states as one
// matrix. The caller gets out.transpose(0, 1) as the [B, T, H] output: a view, so autograd hands
// the backward the output's gradient as it is (no [B, T+1, H] zero-fill and copy). With token
// input the backward sums dz by token and multiplies once at the end,
// grad_U = (sum of dz over U's positions) W_h * (U > 0), instead of a per-position pass over c_t;
// the weight gradient's input share likewise. (Splitting the forward's pre-activation the same
// way, h W^T + relu(p) W^T, was measured to cost fp32 accuracy on saturated states: up to 11x
// the eager loop's error; not done.)
//
// The products: in float32 on an AVX-512 CPU the extension's own register-blocked kernel ("Panel
// products" below): the forwards run each thread's batch rows through all T steps in one
// parallel region, the backward's chain and weight gradients run on the same kernel. Elsewhere
// (float64, no AVX-512, proj_size) per step fused elementwise passes split over batch rows
// (at::parallel_for) around one GEMM over the whole batch (oneDNN with the weight packed once,
// or at::mm). Measurements: benchmarks/RESULTS.md.
#include <torch/extension.h>

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <cstdlib>
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#include <x86intrin.h>
#endif

namespace {

void check_weights(const at::Tensor& w_h) {
  TORCH_CHECK_VALUE(w_h.device().is_cpu(), "the cpu backend needs CPU tensors, got w_h on ", w_h.device());
  TORCH_CHECK_TYPE(w_h.scalar_type() == at::kFloat || w_h.scalar_type() == at::kDouble,
                   "the cpu backend supports float32 and float64, got ", w_h.scalar_type());
  TORCH_CHECK_VALUE(w_h.dim() == 2 && w_h.size(0) == w_h.size(1) && w_h.size(0) > 0,
                    "w_h must be square [H, H], got ", w_h.sizes());
}

void check_like(const char* name, const at::Tensor& t, const at::Tensor& w_h, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.device() == w_h.device(), name, " must be on ", w_h.device(), ", got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == w_h.scalar_type(), name, " must be ", w_h.scalar_type(), ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

// Large per-call tensors (states, saved gates, gradients, projections) come from a cache of
// buffers the extension keeps between calls. Fresh memory costs a page fault per 4 KB on first
// touch (glibc maps every block from 32 MB up straight from the kernel: measured here 1.7 us a
// page, 28 ms for a 64 MB buffer, a fifth of an LSTM step loop's time), and a training loop asks
// for the same sizes every iteration, as the CUDA caching allocator assumes. A tensor's buffer
// returns to the cache when the tensor is freed (the cache is the tensor's allocator: it stays
// resizable); the cache keeps at most kCacheIdleBytes of idle buffers (freeing the oldest beyond)
// and release_cached_buffers() frees them all. Small tensors (under kCacheMinBytes, reused by
// malloc without faults) take at::empty.
constexpr size_t kCacheMinBytes = size_t(1) << 20;
constexpr size_t kCacheIdleBytes = size_t(1) << 30;

class BufferCache final : public c10::Allocator {
 public:
  // A resizable tensor on this cache (a grown one takes a new buffer here and returns the old).
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const at::ScalarType dtype = c10::typeMetaToScalarType(options.dtype());
    if (static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(dtype) < kCacheMinBytes) {
      return at::empty(sizes, options);
    }
    return at::detail::empty_generic(sizes, this, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, c10::nullopt);
  }

  // Each buffer starts with a 64-byte header holding its size; the data follows (64-byte aligned).
  c10::DataPtr allocate(size_t bytes) override {
    void* base = take(bytes);
    if (base == nullptr) {
      base = std::aligned_alloc(kHeader, kHeader + (bytes + kHeader - 1) / kHeader * kHeader);
      TORCH_CHECK(base != nullptr, "fused_rnn: out of memory allocating ", bytes, " bytes");
      *static_cast<size_t*>(base) = bytes;
    }
    return {static_cast<char*>(base) + kHeader, base, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Frees every idle buffer; returns how many bytes that was.
  size_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t freed = idle_bytes_;
    for (void* base : idle_) std::free(base);
    idle_.clear();
    idle_bytes_ = 0;
    return freed;
  }

  size_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return idle_bytes_;
  }

 private:
  static constexpr size_t kHeader = 64;

  static size_t size_of(void* base) { return *static_cast<size_t*>(base); }

  // An idle buffer of exactly `bytes` (the sizes of a training loop repeat exactly), or null.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      if (size_of(*it) == bytes) {
        void* base = *it;
        idle_bytes_ -= bytes;
        idle_.erase(it);
        return base;
      }
    }
    return nullptr;
  }

  static void give_back(void* base);

  std::mutex mutex_;
  std::vector<void*> idle_;  // oldest first
  size_t idle_bytes_ = 0;
};

// Never destroyed: tensors holding its buffers may outlive static destruction at exit.
BufferCache& buffer_cache() {
  static BufferCache* cache = new BufferCache();
  return *cache;
}

void BufferCache::give_back(void* base) {
  BufferCache& cache = buffer_cache();
  std::lock_guard<std::mutex> lock(cache.mutex_);
  cache.idle_.push_back(base);
  cache.idle_bytes_ += size_of(base);
  while (cache.idle_bytes_ > kCacheIdleBytes) {  // the oldest first
    cache.idle_bytes_ -= size_of(cache.idle_.front());
    std::free(cache.idle_.front());
    cache.idle_.erase(cache.idle_.begin());
  }
}

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return buffer_cache().empty(sizes, options);
}

// Batch rows per task of the elementwise passes.
constexpr int64_t kRowGrain = 16;
// Rows per GEMM of the backward's weight gradient (it runs once per chunk of steps).
constexpr int64_t kGemmRows = 8192;

// The elementwise passes, one row at a time; __restrict__ lets the compiler vectorize them, and
// on x86-64 gcc also builds AVX-512 and AVX2+FMA copies, one chosen at load time (AVX2 copies
// made v0.1 15-20% faster; the tanh runs 2x faster with FMA and AVX-512 than with AVX2 alone).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ROW_KERNEL __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ROW_KERNEL
#endif

// a = h_prev + relu(p); a NaN in p passes through, as in torch.relu
template <typename T>
ROW_KERNEL void relu_add_row(const T* __restrict__ h_prev, const T* __restrict__ p, T* __restrict__ a, int64_t H) {
  for (int64_t j = 0; j < H; ++j) a[j] = h_prev[j] + (p[j] < T(0) ? T(0) : p[j]);
}

// out = x + y
template <typename T>
ROW_KERNEL void add_rows(const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ out, int64_t H) {
  for (int64_t j = 0; j < H; ++j) out[j] = x[j] + y[j];
}

// e^y for |y| <= 300 in double, to a few ulp, without calls or branches so that loops over rows
// vectorize: y = n ln2 + r (n by the magic-number rounding, no float-to-int conversion), e^r by
// Taylor to r^9 on |r| <= ln2 / 2, times 2^n built in the exponent bits. NaN propagates.
static inline __attribute__((always_inline)) double exp_in_range(double y) {
  constexpr double log2e = 1.4426950408889634, ln2_hi = 0.6931471803691238, ln2_lo = 1.9082149292705877e-10;
  constexpr double round_magic = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  const double kd = y * log2e + round_magic;
  const double n = kd - round_magic;
  const double r = (y - n * ln2_hi) - n * ln2_lo;
  const double e = 1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (1.0 / 720
                   + r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880)))))))));
  uint64_t bits;
  std::memcpy(&bits, &kd, sizeof bits);
  bits = (bits - 0x4338000000000000ull + 1023u) << 52;  // the double 2^n
  double scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

// tanh(x) for float: the correctly rounded tanh but in rare cases (488 of 4M random inputs here,
// none off by more than 0.53 ulp), vectorizable. It has to be that close: the backward's 1 - h^2
// amplifies any error in h near |h| = 1, and a rational approximation of 4e-7 relative error
// made fp32 gradients up to 20x less accurate than the eager loop's (whose tanh is within 1 ulp).
// Below |x| = 0.2, x + x^3 P(x^2) in float (the correction is under 1.3% of x, so its own
// rounding is a small fraction of an ulp); above, 1 - 2 / (exp(2|x|) + 1) in double. Costs about
// twice a float-only version (~1 ns per element on one core). NaN propagates; +-inf gives +-1.
static inline __attribute__((always_inline)) float tanh_of(float x) {
  constexpr float t3 = -1.0f / 3, t5 = 2.0f / 15, t7 = -17.0f / 315, t9 = 62.0f / 2835;
  float ax = std::fabs(x);
  ax = ax > 9.5f ? 9.5f : ax;  // tanh rounds to 1 beyond; keeps exp finite (NaN passes through)
  const float x2 = ax * ax;
  const float small = ax + ax * x2 * (t3 + x2 * (t5 + x2 * (t7 + x2 * t9)));
  const float big = static_cast<float>(1.0 - 2.0 / (exp_in_range(2.0 * static_cast<double>(ax)) + 1.0));
  return std::copysign(ax < 0.2f ? small : big, x);
}

static inline double tanh_of(double x) { return std::tanh(x); }

// sigmoid(x) = 1 / (1 + e^-x) for float, in double and rounded once: within rounding of the
// exact value everywhere (no cancellation for large negative x, where it is e^x). x is clamped
// to [-110, 110], beyond which the float result no longer changes; NaN propagates.
static inline __attribute__((always_inline)) float sigmoid_of(float x) {
  float cx = x < -110.0f ? -110.0f : x;
  cx = cx > 110.0f ? 110.0f : cx;
  return static_cast<float>(1.0 / (1.0 + exp_in_range(-static_cast<double>(cx))));
}

static inline double sigmoid_of(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// h = tanh(h + b) in place (h: a GEMM's output row), vectorized (tanh_of).
ROW_KERNEL void bias_tanh_row_portable(float* __restrict__ h, const float* __restrict__ b, int64_t H) {
  for (int64_t j = 0; j < H; ++j) h[j] = tanh_of(h[j] + b[j]);
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// The same on AVX-512, cheaper and closer still: tanh|x| = m / (m + 2) with m = e^{2|x|} - 1
// in double, which has no cancellation at small |x| (so no float branch below 0.2), and m from
// a 16-entry table: 2|x| = (16 k + j) ln2 / 16 + r with |r| <= ln2 / 32, so
// m = s expm1(r) + (s - 1), s = 2^k 2^{j/16} (the table read by one permute), expm1(r) by Taylor
// to r^5 (relative error under 7e-12). Measured on all 2.2e9 floats of [-10, 10]: 785 not
// correctly rounded, none by more than 0.5001 ulp (tanh_of: 77785, 0.527 ulp), 0.79 against
// 0.92 ns an element on one core. NaN propagates; +-inf gives +-1.
// (gcc 12 warns falsely about its own intrinsics' undefined-register idiom here)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
alignas(64) const double kExp2Sixteenths[16] = {
    1.0, 1.0442737824274138, 1.0905077326652577, 1.1387886347566916, 1.189207115002721, 1.2418578120734840,
    1.2968395546510096, 1.3542555469368927, 1.4142135623730951, 1.4768261459394993, 1.5422108254079407,
    1.6104903319492543, 1.6817928305074290, 1.7562521603732995, 1.8340080864093424, 1.9152065613971474};

__attribute__((target("avx512f,avx512dq"))) inline __m512d tanh_of_abs(__m512d ax, __m512d table_lo,
                                                                       __m512d table_hi) {
  const __m512d magic = _mm512_set1_pd(6755399441055744.0);  // 1.5 * 2^52: adding it rounds to an integer
  const __m512d y = _mm512_add_pd(ax, ax);
  const __m512d nd = _mm512_fmadd_pd(y, _mm512_set1_pd(16 * 1.4426950408889634), magic);
  const __m512d n = _mm512_sub_pd(nd, magic);  // 16 k + j >= 0
  __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(0.6931471803691238 / 16), y);
  r = _mm512_fnmadd_pd(n, _mm512_set1_pd(1.9082149292705877e-10 / 16), r);
  const __m512i n_int = _mm512_sub_epi64(_mm512_castpd_si512(nd), _mm512_castpd_si512(magic));
  const __m512d t = _mm512_permutex2var_pd(table_lo, n_int, table_hi);  // by n's low 4 bits: j
  const __m512i k_bits = _mm512_slli_epi64(_mm512_srli_epi64(n_int, 4), 52);
  const __m512d s = _mm512_castsi512_pd(_mm512_add_epi64(_mm512_castpd_si512(t), k_bits));  // 2^k t
  __m512d q = _mm512_fmadd_pd(_mm512_set1_pd(1.0 / 120), r, _mm512_set1_pd(1.0 / 24));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(1.0 / 6));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(0.5));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(1.0));
  q = _mm512_mul_pd(q, r);  // expm1(r)
  const __m512d m = _mm512_fmadd_pd(s, q, _mm512_sub_pd(s, _mm512_set1_pd(1.0)));  // s - 1 is exact for s < 2
  return _mm512_div_pd(m, _mm512_add_pd(m, _mm512_set1_pd(2.0)));
}

__attribute__((target("avx512f,avx512dq"))) void bias_tanh_row_avx512(float* __restrict__ h,
                                                                      const float* __restrict__ b, int64_t H) {
  const __m512d table_lo = _mm512_load_pd(kExp2Sixteenths), table_hi = _mm512_load_pd(kExp2Sixteenths + 8);
  const __m512 sign = _mm512_set1_ps(-0.0f), cap = _mm512_set1_ps(9.5f);
  int64_t j = 0;
  for (; j + 16 <= H; j += 16) {
    const __m512 x = _mm512_add_ps(_mm512_loadu_ps(h + j), _mm512_loadu_ps(b + j));
    // tanh rounds to 1 beyond 9.5 (and e^19 stays finite); min(cap, NaN) is the NaN
    const __m512 ax = _mm512_min_ps(cap, _mm512_andnot_ps(sign, x));
    const __m256 ax_hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(ax), 1));
    const __m512d lo = tanh_of_abs(_mm512_cvtps_pd(_mm512_castps512_ps256(ax)), table_lo, table_hi);
    const __m512d hi = tanh_of_abs(_mm512_cvtps_pd(ax_hi), table_lo, table_hi);
    const __m512 t = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)), _mm512_cvtpd_ps(hi), 1);
    _mm512_storeu_ps(h + j, _mm512_or_ps(t, _mm512_and_ps(x, sign)));
  }
  if (j < H) bias_tanh_row_portable(h + j, b + j, H - j);
}
#pragma GCC diagnostic pop
#endif

void bias_tanh_row(float* __restrict__ h, const float* __restrict__ b, int64_t H) {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  if (avx512) return bias_tanh_row_avx512(h, b, H);
#endif
  bias_tanh_row_portable(h, b, H);
}

void bias_tanh_row(double* __restrict__ h, const double* __restrict__ b, int64_t H) {
  for (int64_t j = 0; j < H; ++j) h[j] = std::tanh(h[j] + b[j]);
}

// h = relu(h + b) in place; NaN passes through, as in torch.relu
template <typename T>
ROW_KERNEL void bias_relu_row(T* __restrict__ h, const T* __restrict__ b, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T x = h[j] + b[j];
    h[j] = x < T(0) ? T(0) : x;
  }
}


// dz = (grad_out + carry) * (1 - h^2); db += dz (this block's share of the bias gradient; db
// null: no bias to differentiate)
template <typename T>
ROW_KERNEL void tanh_grad_row(const T* __restrict__ grad_out, const T* __restrict__ carry, const T* __restrict__ h,
                              T* __restrict__ dz, T* __restrict__ db, int64_t H) {
  for (int64_t j = 0; j < H; ++j) dz[j] = (grad_out[j] + carry[j]) * (T(1) - h[j] * h[j]);
  if (db != nullptr) {
    for (int64_t j = 0; j < H; ++j) db[j] += dz[j];
  }
}

// dz = (grad_out + carry) * (h > 0), relu's gradient from its output (g passes where h is NaN,
// as in torch.relu's backward); db += dz as in tanh_grad_row
template <typename T>
ROW_KERNEL void relu_state_grad_row(const T* __restrict__ grad_out, const T* __restrict__ carry,
                                    const T* __restrict__ h, T* __restrict__ dz, T* __restrict__ db, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T g = grad_out[j] + carry[j];
    dz[j] = h[j] <= T(0) ? T(0) : g;
  }
  if (db != nullptr) {
    for (int64_t j = 0; j < H; ++j) db[j] += dz[j];
  }
}

// sum += x
template <typename T>
ROW_KERNEL void add_into_row(const T* __restrict__ x, T* __restrict__ sum, int64_t H) {
  for (int64_t j = 0; j < H; ++j) sum[j] += x[j];
}

// dp = c * (p > 0), the gradient reaching p; a = h_prev + relu(p) for the weight gradient. A NaN
// in p passes c to dp and NaN to a, as torch.relu does.
template <typename T>
ROW_KERNEL void relu_grad_row(const T* __restrict__ c, const T* __restrict__ p, const T* __restrict__ h_prev,
                              T* __restrict__ dp, T* __restrict__ a, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T cj = c[j], pj = p[j];  // loaded unconditionally, so the selects vectorize
    dp[j] = pj <= T(0) ? T(0) : cj;
  }
  relu_add_row(h_prev, p, a, H);
}

// The cells (fused_rnn/cells.py). kInputBeforeProduct: h_t = act((h_{t-1} + relu(p_t)) W^T + b)
// (the course's) or act(h_{t-1} W^T + q_t) (nn.RNN's, both biases in q). activate: h = act(h + x)
// in place on the product's output row, x = b or q_t. gradient: dz = (grad_out + carry) * act'
// from the state h (db += dz where db is not null).
struct Course {
  static constexpr bool kInputBeforeProduct = true;
  template <typename T>
  static void activate(T* h, const T* x, int64_t H) { bias_tanh_row(h, x, H); }
  template <typename T>
  static void gradient(const T* grad_out, const T* carry, const T* h, T* dz, T* db, int64_t H) {
    tanh_grad_row(grad_out, carry, h, dz, db, H);
  }
};

struct ElmanTanh : Course {  // the course's pointwise maths, the input after the product
  static constexpr bool kInputBeforeProduct = false;
};

struct ElmanRelu {
  static constexpr bool kInputBeforeProduct = false;
  template <typename T>
  static void activate(T* h, const T* x, int64_t H) { bias_relu_row(h, x, H); }
  template <typename T>
  static void gradient(const T* grad_out, const T* carry, const T* h, T* dz, T* db, int64_t H) {
    relu_state_grad_row(grad_out, carry, h, dz, db, H);
  }
};

// Calls fn(Cell{}) with the struct of the cell named `name`.
template <typename F>
auto with_cell(const std::string& name, const F& fn) {
  if (name == "course") return fn(Course{});
  if (name == "elman_tanh") return fn(ElmanTanh{});
  if (name == "elman_relu") return fn(ElmanRelu{});
  TORCH_CHECK_VALUE(false, "cell must be 'course', 'elman_tanh' or 'elman_relu', got '", name, "'");
}

// The gated cells (design notes, section 2b), a struct each with its pointwise step forward and
// backward on one batch row; one time loop forward (gated_fwd_cell) and one backward
// (gated_bwd_cell) take them as a template parameter. Per row, a = h_{t-1} W_hh^T (the step's
// product, [G*H]), q = the step's input rows (the biases that fold into it included).
//
// forward_row(a, q, b, h_prev, c_prev, h, c, saved, H): h = the new state (the LSTM's m_t =
//   o tanh(c_t), before any projection), c = c_t (LSTM), saved = what the backward reads.
// backward_row(go, carry, gcs, saved, c_prev, c, h_prev, dq, da, carry_c, direct, H): with the
//   gradient at the new state g = go + carry (and, LSTM, gcs + carry_c at c_t): dq = dL/dq_t,
//   da = dL/da_t where it differs from dq (GRU), carry_c = the LSTM's carry to c_{t-1} (in
//   place), direct = the GRU's share carried to h_{t-1} outside the product (g z).
struct Lstm {
  static constexpr int64_t kGates = 4;
  static constexpr bool kCellState = true;  // carries c
  static constexpr bool kSeparateDa = false;  // da = dq
  template <typename T>
  static ROW_KERNEL void forward_row(const T* __restrict__ a, const T* __restrict__ q, const T* __restrict__,
                                     const T* __restrict__, const T* __restrict__ c_prev, T* __restrict__ h,
                                     T* __restrict__ c, T* __restrict__ saved, int64_t H) {
    for (int64_t j = 0; j < H; ++j) {
      const T i = sigmoid_of(a[j] + q[j]), f = sigmoid_of(a[H + j] + q[H + j]);
      const T g = tanh_of(a[2 * H + j] + q[2 * H + j]), o = sigmoid_of(a[3 * H + j] + q[3 * H + j]);
      const T cj = f * c_prev[j] + i * g;
      c[j] = cj;
      h[j] = o * tanh_of(cj);
      saved[j] = i;
      saved[H + j] = f;
      saved[2 * H + j] = g;
      saved[3 * H + j] = o;
    }
  }
  template <typename T>
  static ROW_KERNEL void backward_row(const T* __restrict__ go, const T* __restrict__ carry, const T* __restrict__ gcs,
                                      const T* __restrict__ saved, const T* __restrict__ c_prev,
                                      const T* __restrict__ c, const T* __restrict__, T* __restrict__ dq, T* __restrict__,
                                      T* __restrict__ carry_c, T* __restrict__, int64_t H) {
    for (int64_t j = 0; j < H; ++j) {
      const T i = saved[j], f = saved[H + j], g = saved[2 * H + j], o = saved[3 * H + j];
      const T gh = go[j] + carry[j];
      const T tc = tanh_of(c[j]);
      const T dc = gcs[j] + carry_c[j] + gh * o * (T(1) - tc * tc);
      dq[j] = dc * g * i * (T(1) - i);
      dq[H + j] = dc * c_prev[j] * f * (T(1) - f);
      dq[2 * H + j] = dc * i * (T(1) - g * g);
      dq[3 * H + j] = gh * tc * o * (T(1) - o);
      carry_c[j] = dc * f;
    }
  }
};

struct Gru {
  static constexpr int64_t kGates = 3;
  static constexpr bool kCellState = false;
  static constexpr bool kSeparateDa = true;  // da_n = dq_n * r (b_hn sits inside the reset gate)
  template <typename T>
  static ROW_KERNEL void forward_row(const T* __restrict__ a, const T* __restrict__ q, const T* __restrict__ b,
                                     const T* __restrict__ h_prev, const T* __restrict__, T* __restrict__ h,
                                     T* __restrict__, T* __restrict__ saved, int64_t H) {
    for (int64_t j = 0; j < H; ++j) {
      const T an = a[2 * H + j] + b[2 * H + j];
      const T r = sigmoid_of(q[j] + (a[j] + b[j])), z = sigmoid_of(q[H + j] + (a[H + j] + b[H + j]));
      const T n = tanh_of(q[2 * H + j] + r * an);
      h[j] = (T(1) - z) * n + z * h_prev[j];
      saved[j] = r;
      saved[H + j] = z;
      saved[2 * H + j] = n;
      saved[3 * H + j] = an;
    }
  }
  template <typename T>
  static ROW_KERNEL void backward_row(const T* __restrict__ go, const T* __restrict__ carry, const T* __restrict__,
                                      const T* __restrict__ saved, const T* __restrict__, const T* __restrict__,
                                      const T* __restrict__ h_prev, T* __restrict__ dq, T* __restrict__ da,
                                      T* __restrict__, T* __restrict__ direct, int64_t H) {
    for (int64_t j = 0; j < H; ++j) {
      const T r = saved[j], z = saved[H + j], n = saved[2 * H + j], an = saved[3 * H + j];
      const T gh = go[j] + carry[j];
      const T en = gh * (T(1) - z) * (T(1) - n * n);
      const T ez = gh * (h_prev[j] - n) * z * (T(1) - z);
      const T er = en * an * r * (T(1) - r);
      dq[j] = er;
      dq[H + j] = ez;
      dq[2 * H + j] = en;
      da[j] = er;
      da[H + j] = ez;
      da[2 * H + j] = en * r;
      direct[j] = gh * z;
    }
  }
};

// Calls fn(Cell{}) with the struct of the gated cell named `name`.
template <typename F>
auto with_gated_cell(const std::string& name, const F& fn) {
  if (name == "lstm") return fn(Lstm{});
  if (name == "gru") return fn(Gru{});
  TORCH_CHECK_VALUE(false, "gated cell must be 'lstm' or 'gru', got '", name, "'");
}

// m = o tanh(c) for one row: the LSTM's state before its projection, from the saved gates.
template <typename T>
ROW_KERNEL void lstm_m_row(const T* __restrict__ saved, const T* __restrict__ c, T* __restrict__ m, int64_t H) {
  for (int64_t j = 0; j < H; ++j) m[j] = saved[3 * H + j] * tanh_of(c[j]);
}

// y = x W^T for one weight W [N, K] used at every step of a call. Float32: oneDNN's matmul on a
// copy of W packed once per call, through torch's own mkldnn::_reorder_linear_weight and
// mkldnn::_linear_pointwise (the ops inductor's CPU path uses; private, so found through the
// dispatcher and probed: a torch without them, or one whose ops fail here, falls back). On the
// LSTM's step [64, 256] x [256, 1024] it ran at ~1.6x at::mm, which repacks W on every call
// (benchmarks/RESULTS.md). Float64, or no oneDNN: at::mm.
class StepProduct {
 public:
  StepProduct(const at::Tensor& w, int64_t batch) : w_t_(w.t()) {
    if (w.scalar_type() != at::kFloat || !at::hasMKLDNN()) return;
    try {
      auto& dispatcher = c10::Dispatcher::singleton();
      auto reorder = dispatcher.findSchema({"mkldnn::_reorder_linear_weight", ""});
      linear_ = dispatcher.findSchema({"mkldnn::_linear_pointwise", ""});
      if (!reorder || !linear_) return;
      torch::jit::Stack stack{w.contiguous(), c10::IValue(batch)};
      reorder->callBoxed(&stack);
      packed_ = stack.at(0).toTensor();
    } catch (const std::exception&) {
      packed_ = at::Tensor();  // at::mm answers
    }
  }

  // x [B, K] (contiguous) -> x W^T [B, N]: a new tensor, or `out` (the fallback writes there).
  at::Tensor operator()(const at::Tensor& x, at::Tensor& out) const {
    if (!packed_.defined()) {
      at::mm_out(out, x, w_t_);
      return out;
    }
    torch::jit::Stack stack{x, packed_, c10::IValue(), std::string("none"),
                            c10::List<c10::optional<at::Scalar>>(), c10::IValue(std::string(""))};
    linear_->callBoxed(&stack);
    return stack.at(0).toTensor();
  }

  bool packed() const { return packed_.defined(); }

 private:
  at::Tensor w_t_;
  at::Tensor packed_;
  c10::optional<c10::OperatorHandle> linear_;
};

// ---------------------------------------------------------------------------------------------
// Panel products: the recurrences' step products (every cell) and the dense cells' input
// projection (panel_matmul) by a register-blocked AVX-512 kernel of our own (float32). A weight is
// packed once per call into panels of NV * 16 output columns (panel p: for each k, its columns'
// weights contiguous); one kernel call multiplies R rows of x by one panel in R x NV zmm
// accumulators (24 of the 32 registers) held for the whole K loop and stores them where the
// caller wants them. The gated forward's panels hold all G gates of 16 units (NV = G) and store
// the product as the [rows, G*H] rows the cell's pointwise step reads, for a group of rows still
// in L1/L2; every other product has panels of 64 consecutive columns (NV = 4). Every batch row is
// independent of the others in every time loop, forward and backward, so there each thread runs
// the whole time loop on its own rows (the course's backward: on fixed blocks of rows, each with
// its own partial sums): one parallel region per call, no barrier, no per-step dispatch, the
// weight packed once per call instead of once per step; a row gets the same bits whatever the
// thread count. The weight gradients, after the loops, are products of the
// same kernel (add_transposed_product). The StepProduct / at::mm path runs where this does not
// (float64, no AVX-512, proj_size, or switched off by use_panel_products(false)).
constexpr int64_t kLanes = 16;  // floats per zmm
constexpr int64_t kAccumulators = 24;
bool panel_products_on = true;

bool panel_products_here() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512 && panel_products_on;
#else
  return false;
#endif
}

// Splits n rows into calls of at most `most` rows, as even as possible (5 x 6 + 2 would leave the
// last call with 2 rows: 6, 6, 5, 5, 5, 5 keeps every call's accumulators busy).
template <typename F>
void for_each_row_call(int64_t begin, int64_t end, int64_t most, const F& fn) {
  const int64_t n = end - begin, calls = (n + most - 1) / most;
  for (int64_t i = 0, b = begin; i < calls; ++i) {
    const int64_t rows = n / calls + (i < n % calls ? 1 : 0);
    fn(b, rows);
    b += rows;
  }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// y[r, :] (+)= x[r, :K] @ panel (+ bias) for r < R: x rows `x_stride` apart, the panel [K, NV * 16]
// 64-byte aligned; zmm v of row r goes to y + r * y_stride + v * v_stride. Only the panel's first
// `valid` columns are stored (a last panel's padding never is): each zmm's first `valid` floats
// where they are one gate each of the same units (Gates), else the panel's first `valid` columns
// (and `bias`, if not null, holds those columns' biases, laid out as a row of y). Accumulate adds
// the product to y at the end (a sum of K terms, then one rounding into y).
// Transposed, the weight gradient's form y (+)= x^T panel: row r of the product is column r of x
// (x[k * x_stride + r]: the rows of a [K, M] operand, see add_transposed_product). The panel's row k is
// at panel + k * panel_stride.
template <int R, int NV, bool Gates, bool Accumulate, bool Transposed = false>
__attribute__((target("avx512f"))) void panel_tile(const float* __restrict__ x, int64_t x_stride,
                                                   const float* __restrict__ panel, int64_t panel_stride, int64_t K,
                                                   float* __restrict__ y, int64_t y_stride, int64_t v_stride,
                                                   int64_t valid, const float* __restrict__ bias) {
  __mmask16 mask[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t lanes = Gates ? valid : valid - v * kLanes;
    mask[v] = lanes >= kLanes ? __mmask16(0xFFFF) : lanes <= 0 ? __mmask16(0) : __mmask16((1u << lanes) - 1);
  }
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = bias ? _mm512_maskz_loadu_ps(mask[v], bias + v * v_stride) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) w[v] = _mm512_load_ps(panel + k * panel_stride + v * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_set1_ps(Transposed ? x[k * x_stride + r] : x[r * x_stride + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(xr, w[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* out = y + r * y_stride + v * v_stride;
      if (Accumulate) acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_maskz_loadu_ps(mask[v], out));
      _mm512_mask_storeu_ps(out, mask[v], acc[r][v]);
    }
  }
}

// Product timing (benchmarks/product_rate.py): while timing_products is on, every panel tile adds
// the time stamp counter ticks it took to product_ticks (all threads), so that a benchmark can
// tell the products' own FLOP rate inside a recurrence from the time of the work around them.
std::atomic<bool> timing_products{false};
std::atomic<uint64_t> product_ticks{0};

// Calls fn(std::integral_constant<int, R>{}) for R = rows (1 .. 24 / NV): the tiles' row counts
// are template parameters.
template <int NV, typename F>
void with_tile_rows(int64_t rows, const F& fn) {
  const bool timed = timing_products.load(std::memory_order_relaxed);
  const uint64_t start = timed ? __rdtsc() : 0;
  switch (rows) {
#define FUSED_RNN_PANEL_ROWS(R)                                                                    \
  case R:                                                                                          \
    if constexpr (NV * R <= kAccumulators) {                                                      \
      fn(std::integral_constant<int, R>{});                                                        \
      if (timed) product_ticks.fetch_add(__rdtsc() - start, std::memory_order_relaxed);           \
      return;                                                                                      \
    }                                                                                              \
    break;
    FUSED_RNN_PANEL_ROWS(1) FUSED_RNN_PANEL_ROWS(2) FUSED_RNN_PANEL_ROWS(3) FUSED_RNN_PANEL_ROWS(4)
    FUSED_RNN_PANEL_ROWS(5) FUSED_RNN_PANEL_ROWS(6) FUSED_RNN_PANEL_ROWS(7) FUSED_RNN_PANEL_ROWS(8)
#undef FUSED_RNN_PANEL_ROWS
  }
  TORCH_CHECK(false, "panel products: ", rows, " rows");
}

// panel_tile for `rows` rows (1 .. 24 / NV), the panel packed (pack_panels).
template <int NV, bool Gates, bool Accumulate = false>
void panel_product(const float* x, int64_t x_stride, int64_t rows, const float* panel, int64_t K, float* y,
                   int64_t y_stride, int64_t v_stride, int64_t valid, const float* bias = nullptr) {
  with_tile_rows<NV>(rows, [&](auto R) {
    panel_tile<R.value, NV, Gates, Accumulate>(x, x_stride, panel, NV * kLanes, K, y, y_stride, v_stride, valid, bias);
  });
}

// sums[j] += sum_{k < depth} a[k * a_stride + j] for j < n (in that order: a register per 16
// columns summed over k, then added to sums).
__attribute__((target("avx512f"))) void add_column_sums(const float* a, int64_t a_stride, int64_t depth, int64_t n,
                                                        float* sums) {
  for (int64_t j = 0; j < n; j += kLanes) {
    const __mmask16 mask = n - j >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t k = 0; k < depth; ++k) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, a + k * a_stride + j));
    _mm512_mask_storeu_ps(sums + j, mask, _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, sums + j)));
  }
}

// c[M, N] += a^T b for float32 a [K, M] and b [K, N], rows a_stride, b_stride, c_stride apart:
// the weight gradients sum_t dz_t^T h_t. Each thread takes its share of c's rows and runs all of K
// over them in blocks of kDepth steps: per block, each tile broadcasts its columns of a's rows
// where they lie (a's row k holds the tile's rows' k-th terms side by side) and multiplies them
// by b's rows in panels of 64 columns, adding a sum of kDepth terms to c. b's panels are read in
// place where they are whole and 64-byte aligned in every row, as the states' are at H = 64n
// (2-5% faster at H = 256), else packed per block (as pack_columns packs a weight). While a
// block's tiles run, the next block's rows of a and b are fetched into L2, a slice per tile row:
// the first touch of rows 1-4 KB apart is what held the tiles back (packing a into strips per
// block, as before, cost 10-15% of the product at B*T = 4096-16384, H = 256; benchmarks/RESULTS.md).
// c's bits do not depend on the thread count, and a sum's rounding grows with kDepth + K / kDepth
// terms, not K. With column_sums (not null), column_sums[m] += sum_k a[k, m] too, summed per
// block: the bias gradient that goes with the weight gradient.
constexpr int64_t kDepth = 128;
// b_group > 0: b's rows come in groups of b_group rows b_stride apart, the groups b_group_stride
// apart (row k at b + (k / b_group) b_group_stride + (k % b_group) b_stride: a time-major walk
// over a batch-first [B, T, N] input).
void add_transposed_product(const float* a, int64_t a_stride, const float* b, int64_t b_stride, int64_t K, int64_t M,
                            int64_t N, float* c, int64_t c_stride, float* column_sums, int64_t b_group = 0,
                            int64_t b_group_stride = 0) {
  auto b_row = [&](int64_t k) {
    return b_group > 0 ? b + (k / b_group) * b_group_stride + (k % b_group) * b_stride : b + k * b_stride;
  };
  constexpr int64_t NV = 4, width = NV * kLanes, rows_per_call = kAccumulators / NV;
  const int64_t panels = (N + width - 1) / width;
  // b's rows read where they lie when every panel is whole and 64-byte aligned in every row
  const bool direct = b_group == 0 && N % width == 0 && b_stride % kLanes == 0 &&
                      reinterpret_cast<uintptr_t>(b) % (kLanes * sizeof(float)) == 0;
  at::parallel_for(0, M, rows_per_call, [&](int64_t m0, int64_t m1) {
    at::Tensor packed = direct ? at::Tensor() : at::empty({panels, kDepth, width}, at::kFloat);
    float* pk = direct ? nullptr : packed.data_ptr<float>();
    const int64_t row_calls = (m1 - m0 + rows_per_call - 1) / rows_per_call;
    for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
      const int64_t depth = std::min(kDepth, K - k0);
      for (int64_t p = 0; p < panels && !direct; ++p) {
        const int64_t n0 = p * width, n = std::min(width, N - n0);
        for (int64_t k = 0; k < depth; ++k) {
          float* dst = pk + (p * depth + k) * width;
          std::copy(b_row(k0 + k) + n0, b_row(k0 + k) + n0 + n, dst);
          std::fill(dst + n, dst + width, 0.0f);
        }
      }
      if (column_sums != nullptr) add_column_sums(a + k0 * a_stride + m0, a_stride, depth, m1 - m0, column_sums + m0);
      const int64_t next = k0 + depth, next_depth = std::min(kDepth, K - next);
      int64_t call = 0;
      for_each_row_call(m0, m1, rows_per_call, [&](int64_t m, int64_t rows) {
        for (int64_t k = next + call * next_depth / row_calls; k < next + (call + 1) * next_depth / row_calls; ++k) {
          for (int64_t n = 0; n < N; n += kLanes) _mm_prefetch(reinterpret_cast<const char*>(b_row(k) + n), _MM_HINT_T1);
          for (int64_t j = m0; j < m1; j += kLanes) {
            _mm_prefetch(reinterpret_cast<const char*>(a + k * a_stride + j), _MM_HINT_T1);
          }
        }
        ++call;
        with_tile_rows<NV>(rows, [&](auto R) {
          for (int64_t p = 0; p < panels; ++p) {
            const float* panel = direct ? b + k0 * b_stride + p * width : pk + p * depth * width;
            panel_tile<R.value, NV, false, true, true>(a + k0 * a_stride + m, a_stride, panel,
                                                       direct ? b_stride : width, depth, c + m * c_stride + p * width,
                                                       c_stride, kLanes, N - p * width, nullptr);
          }
        });
      });
    }
  });
}
#else
template <int NV, bool Gates, bool Accumulate = false>
void panel_product(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t,
                   const float* = nullptr) {
  TORCH_CHECK(false, "panel products need AVX-512");
}
void add_transposed_product(const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t,
                            float*, int64_t = 0, int64_t = 0) {
  TORCH_CHECK(false, "panel products need AVX-512");
}
#endif

// The double loops that call panel_product compile against this and never run it (the panel
// products are float32 only).
template <int NV, bool Gates, bool Accumulate = false>
void panel_product(const double*, int64_t, int64_t, const float*, int64_t, double*, int64_t, int64_t, int64_t,
                   const double* = nullptr) {
  TORCH_CHECK(false, "panel products are float32 only");
}

// grad_w [M, N] += d^T x for d [K, M] and x [K, N]: the weight gradients; and, if grad_b is given
// ([M], contiguous), grad_b += d's column sums (the bias gradient). On the panel products where
// they run (float32, AVX-512; rows with unit stride), else addmm_ and sum.
void add_weight_gradient(at::Tensor& grad_w, const at::Tensor& d, const at::Tensor& x, at::Tensor* grad_b = nullptr) {
  if (d.size(0) == 0) return;
  if (grad_w.scalar_type() == at::kFloat && panel_products_here() && grad_w.is_contiguous() && d.stride(1) == 1 &&
      x.stride(1) == 1) {
    add_transposed_product(d.data_ptr<float>(), d.stride(0), x.data_ptr<float>(), x.stride(0), d.size(0), d.size(1),
                           x.size(1), grad_w.data_ptr<float>(), grad_w.size(1),
                           grad_b != nullptr ? grad_b->data_ptr<float>() : nullptr);
  } else {
    grad_w.addmm_(d.t(), x);
    if (grad_b != nullptr) grad_b->add_(d.sum(0));
  }
}

// grad_w += sum_t d_t^T h_{t-1} for time-major d [T, B, M] and states out [T, B, N] (h_t =
// out[t - 1]; h_0 = h0, or zeros without it): h_1..h_{T-1} are one block, h_0 on its own. And,
// if grad_b is given, grad_b += sum_t d_t's column sums, summed with it.
void add_recurrent_weight_gradient(at::Tensor& grad_w, const at::Tensor& d, const at::Tensor& out,
                                   const at::Tensor& h0, bool has_h0, at::Tensor* grad_b = nullptr) {
  const int64_t T = d.size(0), B = d.size(1);
  if (T > 1) {
    add_weight_gradient(grad_w, d.narrow(0, 1, T - 1).view({(T - 1) * B, d.size(2)}),
                        out.narrow(0, 0, T - 1).view({(T - 1) * B, out.size(2)}), grad_b);
  }
  if (has_h0) {
    add_weight_gradient(grad_w, d[0], h0, grad_b);
  } else if (grad_b != nullptr) {
    grad_b->add_(d[0].sum(0));
  }
}

// Packs a weight into panels of NV * 16 columns: packed[p, k, v] = value(column_of(p, v), k), zeros
// where column_of says -1 (the last panel's padding).
template <typename ColumnOf, typename Value>
at::Tensor pack_panels(int64_t panels, int64_t NV, int64_t K, const ColumnOf& column_of, const Value& value) {
  const int64_t width = NV * kLanes;
  at::Tensor packed = at::empty({panels, K, width}, at::kFloat);  // torch's CPU allocator aligns to 64 bytes
  float* out = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t v = 0; v < width; ++v) {
        const int64_t col = column_of(p, v);
        float* dst = out + p * K * width + v;
        for (int64_t k = 0; k < K; ++k) dst[k * width] = col < 0 ? 0.0f : value(col, k);
      }
    }
  });
  return packed;
}

// Products with panels of 64 consecutive output columns (NV = 4): rows per kernel call.
constexpr int64_t kPanelColumns = 4 * kLanes, kPanelRows = kAccumulators / 4;

// A square or [M, K] weight W packed for y = x W^T (transposed) or y = x W, in panels of 64
// consecutive output columns.
at::Tensor pack_columns(const at::Tensor& w, bool transposed) {
  const int64_t M = transposed ? w.size(0) : w.size(1), K = transposed ? w.size(1) : w.size(0);
  const float* w_p = w.data_ptr<float>();
  return pack_panels(
      (M + kPanelColumns - 1) / kPanelColumns, 4, K,
      [&](int64_t p, int64_t v) { return p * kPanelColumns + v < M ? p * kPanelColumns + v : int64_t(-1); },
      [&](int64_t col, int64_t k) { return transposed ? w_p[col * K + k] : w_p[k * M + col]; });
}

// y[b, :N] = x[b, :K] W^T for the rows b in [b0, b1) (row b of x at x + b * x_stride, of y at
// y + b * y_stride), W [N, K] packed by pack_columns(W, true) (or W [K, N] by pack_columns(W, false)).
// Float32 only (T = double compiles against panel_product's refusal).
template <typename T>
void rows_times_packed(const T* x, int64_t x_stride, int64_t b0, int64_t b1, const float* packed, int64_t K, T* y,
                       int64_t y_stride, int64_t N) {
  for (int64_t p = 0, c = 0; c < N; ++p, c += kPanelColumns) {
    for_each_row_call(b0, b1, kPanelRows, [&](int64_t b, int64_t rows) {
      panel_product<4, false>(x + b * x_stride, x_stride, rows, packed + p * K * kPanelColumns, K, y + b * y_stride + c,
                              y_stride, kLanes, N - c);
    });
  }
}

// Whether every element of a contiguous tensor is finite (in one pass, no temporaries).
template <typename T>
bool all_finite(const at::Tensor& t) {
  const T* p = t.data_ptr<T>();
  bool finite = true;
  for (int64_t i = 0; i < t.numel(); ++i) finite &= std::isfinite(p[i]);
  return finite;
}

// Runs fn(b0, b1, k) for every block k of `rows` batch rows [b0, b1), blocks spread over the threads.
template <typename F>
void for_each_block(int64_t B, int64_t rows, const F& fn) {
  at::parallel_for(0, (B + rows - 1) / rows, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) fn(k * rows, std::min(B, (k + 1) * rows), k);
  });
}

// Runs fn(b0, b1) once per thread on its share of the B rows (one parallel region).
template <typename F>
void for_each_thread_rows(int64_t B, const F& fn) {
  at::parallel_for(0, B, 4, fn);
}

// Runs fn(b, block) for every batch row b, rows split into fixed blocks of `rows` (a block's
// rows in order), blocks spread over the threads. Per-block partial sums, reduced in block order,
// then give the same bits for any thread count.
template <typename F>
void for_each_row_by_block(int64_t B, const F& fn, int64_t rows = kRowGrain) {
  const int64_t nblocks = (B + rows - 1) / rows;
  at::parallel_for(0, nblocks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t b = k * rows; b < std::min(B, (k + 1) * rows); ++b) fn(b, k);
    }
  });
}

// Rows per block of the backward's per-block sums: kRowGrain, or more for large batches, so that
// there are at most about 8 blocks (each with its own [V, H] token table: fewer tables to zero,
// fill and add, and more of them in cache). Depends on B alone, so the sums' bits do not depend
// on the thread count.
int64_t sum_block_rows(int64_t B) {
  return kRowGrain * std::max<int64_t>(1, (B + kRowGrain - 1) / kRowGrain / 8);
}

// out[i] = sum over blocks k (in order) of parts[k, i], for parts [nblocks, n].
template <typename T>
void sum_blocks(const T* parts, int64_t nblocks, int64_t n, T* out) {
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = T(0);
    for (int64_t k = 0; k < nblocks; ++k) {
      const T* part = parts + k * n;
      for (int64_t i = i0; i < i1; ++i) out[i] += part[i];
    }
  });
}

// Token input sums per token through [V, H] tables (one per block of rows, so that the sums are
// deterministic) when those are no bigger than the [B, T, H] per-position arrays they replace.
bool token_tables(bool tokens, int64_t V, int64_t B, int64_t T) {
  return tokens && (B + sum_block_rows(B) - 1) / sum_block_rows(B) * V <= B * T;
}


}  // namespace

template <typename Cell>
at::Tensor rnn_fwd_cell(const at::Tensor& proj_in, const c10::optional<at::Tensor>& ids_in, const at::Tensor& w_h_in,
                        const c10::optional<at::Tensor>& b_h_in, const c10::optional<at::Tensor>& h0_in,
                        bool ids_checked = false) {
  check_weights(w_h_in);
  constexpr bool elman = !Cell::kInputBeforeProduct;
  const int64_t H = w_h_in.size(0);
  const bool tokens = ids_in.has_value();
  int64_t B, T;
  at::Tensor ids;
  if (elman) {
    TORCH_CHECK_VALUE(!tokens && !b_h_in, "the elman cells take neither ids nor b_h (the biases are in q)");
    TORCH_CHECK_VALUE(proj_in.dim() == 3 && proj_in.size(2) == H, "the elman cells need q [T, B, ", H, "], got ",
                      proj_in.sizes());
    check_like("q", proj_in, w_h_in, proj_in.sizes());
    T = proj_in.size(0);
    B = proj_in.size(1);
  } else if (tokens) {
    ids = ids_in->contiguous();
    TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "ids must be int64, got ", ids.scalar_type());
    TORCH_CHECK_VALUE(ids.dim() == 2, "ids must be [B, T], got ", ids.sizes());
    TORCH_CHECK_VALUE(proj_in.dim() == 2 && proj_in.size(1) == H, "token input needs proj [V, ", H, "], got ",
                      proj_in.sizes());
    check_like("proj", proj_in, w_h_in, proj_in.sizes());
    B = ids.size(0);
    T = ids.size(1);
    if (!ids_checked && ids.numel() > 0) {  // one pass (fused_rnn() checked already; this guards direct calls)
      const auto [lo_t, hi_t] = at::aminmax(ids);
      const int64_t lo = lo_t.item<int64_t>(), hi = hi_t.item<int64_t>();
      TORCH_CHECK_INDEX(lo >= 0 && hi < proj_in.size(0), "token ids must lie in [0, ", proj_in.size(0),
                        "), got values in [", lo, ", ", hi, "]");
    }
  } else {
    TORCH_CHECK_VALUE(proj_in.dim() == 3 && proj_in.size(2) == H, "dense input needs proj [B, T, ", H, "], got ",
                      proj_in.sizes());
    check_like("proj", proj_in, w_h_in, proj_in.sizes());
    B = proj_in.size(0);
    T = proj_in.size(1);
  }
  TORCH_CHECK_VALUE(B > 0 && T > 0, "empty batch or sequence: B=", B, ", T=", T);
  if (b_h_in) check_like("b_h", *b_h_in, w_h_in, {H});
  if (h0_in) check_like("h0", *h0_in, w_h_in, {B, H});

  const at::Tensor proj = proj_in.contiguous();
  const int64_t V = tokens ? proj.size(0) : 0;
  const at::Tensor w_h_t = w_h_in.t();  // a transposed view: BLAS reads it without a copy
  // The bias is added in the tanh pass: addmm would first copy it into every output row.
  const at::Tensor b_h = b_h_in ? b_h_in->contiguous() : at::zeros({H}, w_h_in.options());
  // h_0 (zeros if not given; the elman cells then start from h_1 = act(q_1) and never read it)
  const at::Tensor h0 = h0_in ? h0_in->contiguous() : elman ? at::Tensor() : at::zeros({B, H}, w_h_in.options());
  at::Tensor out = cached_empty({T, B, H}, w_h_in.options());

  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "rnn_fwd", [&] {
    const scalar_t* proj_p = proj.data_ptr<scalar_t>();
    const int64_t* ids_p = tokens ? ids.data_ptr<int64_t>() : nullptr;
    const scalar_t* b_p = b_h.data_ptr<scalar_t>();
    scalar_t* h0_p = h0.defined() ? h0.data_ptr<scalar_t>() : nullptr;
    scalar_t* out_p = out.data_ptr<scalar_t>();
    auto h_row = [&](int64_t t, int64_t b) { return t == 0 ? h0_p + b * H : out_p + ((t - 1) * B + b) * H; };  // h_t
    // W_h for the panel products, where they run (float32, AVX-512)
    const at::Tensor packed = std::is_same_v<scalar_t, float> && panel_products_here()
                                  ? pack_columns(w_h_in.contiguous(), true) : at::Tensor();
    const float* pk = packed.defined() ? packed.data_ptr<float>() : nullptr;
    int64_t t0 = 0;
    if (!elman && tokens && !h0_in && 2 * V <= B) {
      // With h_0 = 0 the first two states depend only on the first two tokens, so they come
      // from [V, H] tables instead of [B, H] GEMMs (at the course's V = 85, B = 512, T = 8 this
      // skips a quarter of the forward's GEMM work):
      //   h_1 = tanh(relu(U[x_0]) W^T + b) = H1[x_0]                with Q = relu(U) W^T, H1 = tanh(Q + b)
      //   h_2 = tanh((h_1 + relu(U[x_1])) W^T + b) = tanh(G[x_0] + Q[x_1] + b)   with G = H1 W^T
      const at::Tensor relu_u = at::relu(proj);
      at::Tensor q, h1, g = T >= 2 ? at::empty({V, H}, out.options()) : at::Tensor();
      if (packed.defined()) {  // each thread its rows of q, h1 and g (a row needs only its own)
        q = at::empty({V, H}, out.options());
        h1 = at::empty({V, H}, out.options());
        const scalar_t* u_p = relu_u.data_ptr<scalar_t>();
        scalar_t* q_p = q.data_ptr<scalar_t>();
        scalar_t* h1_p = h1.data_ptr<scalar_t>();
        for_each_thread_rows(V, [&](int64_t v0, int64_t v1) {
          rows_times_packed(u_p, H, v0, v1, pk, H, q_p, H, H);
          std::copy(q_p + v0 * H, q_p + v1 * H, h1_p + v0 * H);
          for (int64_t v = v0; v < v1; ++v) Cell::activate(h1_p + v * H, b_p, H);
          if (T >= 2) rows_times_packed(h1_p, H, v0, v1, pk, H, g.data_ptr<scalar_t>(), H, H);
        });
      } else {
        q = at::mm(relu_u, w_h_t);
        h1 = q.clone();
        for (int64_t v = 0; v < V; ++v) Cell::activate(h1.data_ptr<scalar_t>() + v * H, b_p, H);
        if (T >= 2) at::mm_out(g, h1, w_h_t);
      }
      scalar_t* h1_p = h1.data_ptr<scalar_t>();
      // h_2's sum is reassociated (G[x_0] + Q[x_1], not (h_1 + relu(U[x_1])) W^T): equal up to
      // rounding while both are finite, but an Inf in either (Inf in W_h, an overflow) can meet
      // one of the other sign where the loop's sum is finite; then the steps run as the loop does.
      if (T < 2 || (all_finite<scalar_t>(q) && all_finite<scalar_t>(g))) {
        const scalar_t* q_p = q.data_ptr<scalar_t>();
        const scalar_t* g_p = T >= 2 ? g.data_ptr<scalar_t>() : nullptr;
        for_each_row_by_block(B, [&](int64_t b, int64_t) {
          const int64_t x0 = ids_p[b * T];
          std::copy(h1_p + x0 * H, h1_p + (x0 + 1) * H, h_row(1, b));
          if (T >= 2) {
            add_rows(g_p + x0 * H, q_p + ids_p[b * T + 1] * H, h_row(2, b), H);
            Cell::activate(h_row(2, b), b_p, H);
          }
        });
        t0 = std::min<int64_t>(T, 2);
      }
    }
    if (elman && !h0_in) {
      // h_0 = 0: h_1 = act(q_1), no product
      for_each_row_by_block(B, [&](int64_t b, int64_t) {
        std::fill(h_row(1, b), h_row(1, b) + H, scalar_t(0));
        Cell::activate(h_row(1, b), proj_p + b * H, H);
      });
      t0 = 1;
    }
    // The GEMM's input: the course's a_t = h_{t-1} + relu(p_t) (contiguous), or the elman cells'
    // h_{t-1} itself (the previous step's block of the states). Its output goes straight into
    // the states (contiguous too), where one pass per step finishes it in place with the
    // activation and, for the course, forms the next step's a while the row is in cache.
    at::Tensor a = elman ? at::Tensor() : at::empty({B, H}, out.options());
    scalar_t* a_p = elman ? nullptr : a.data_ptr<scalar_t>();
    auto p_row = [&](int64_t b, int64_t t) {
      return proj_p + (elman ? t * B + b : tokens ? ids_p[b * T + t] : b * T + t) * H;
    };
    if (!elman && t0 < T) {
      for_each_row_by_block(B, [&](int64_t b, int64_t) { relu_add_row(h_row(t0, b), p_row(b, t0), a_p + b * H, H); });
    }
    auto finish_row = [&](int64_t t, int64_t b) {  // h_t's row from its product, in place
      if (elman) {
        Cell::activate(h_row(t + 1, b), p_row(b, t), H);  // h_t = act(h_{t-1} W^T + q_t)
      } else {
        Cell::activate(h_row(t + 1, b), b_p, H);
        if (t + 1 < T) relu_add_row(h_row(t + 1, b), p_row(b, t + 1), a_p + b * H, H);
      }
    };
    if (packed.defined() && t0 < T) {
      // Each thread all steps of its rows (see "Panel products"): the product into h_t's rows, then
      // their pointwise pass.
      for_each_thread_rows(B, [&](int64_t b0, int64_t b1) {
        for (int64_t t = t0; t < T; ++t) {
          rows_times_packed(elman ? h_row(t, 0) : a_p, H, b0, b1, pk, H, h_row(t + 1, 0), H, H);
          for (int64_t b = b0; b < b1; ++b) finish_row(t, b);
        }
      });
      return;
    }
    for (int64_t t = t0; t < T; ++t) {
      at::Tensor h_next = out[t];
      at::mm_out(h_next, elman ? (t == 0 ? h0 : out[t - 1]) : a, w_h_t);
      for_each_row_by_block(B, [&](int64_t b, int64_t) { finish_row(t, b); });
    }
  });
  return out;
}

template <typename Cell>
std::vector<c10::optional<at::Tensor>> rnn_bwd_cell(const at::Tensor& grad_out_in,
                                                    const c10::optional<at::Tensor>& grad_h_n_in,
                                                    const at::Tensor& out, const c10::optional<at::Tensor>& h0_in,
                                                    const at::Tensor& proj_in, const c10::optional<at::Tensor>& ids_in,
                                                    const at::Tensor& w_h, bool has_bias) {
  check_weights(w_h);
  constexpr bool elman = !Cell::kInputBeforeProduct;
  TORCH_CHECK_VALUE(out.dim() == 3 && out.size(0) >= 1 && out.size(2) == w_h.size(0) && out.is_contiguous(),
                    "out must be the contiguous [T, B, H] states from rnn_fwd, got ", out.sizes());
  const int64_t T = out.size(0), B = out.size(1), H = out.size(2);
  const bool tokens = ids_in.has_value();
  check_like("out", out, w_h, out.sizes());
  const bool has_h0 = h0_in.has_value();
  if (has_h0) check_like("h0", *h0_in, w_h, {B, H});
  check_like("grad_out", grad_out_in, w_h, {B, T, H});
  if (grad_h_n_in) check_like("grad_h_n", *grad_h_n_in, w_h, {B, H});
  at::Tensor ids;
  if (elman) {
    TORCH_CHECK_VALUE(!tokens && !has_bias, "the elman cells take neither ids nor a bias (the biases are in q)");
    // q itself is never read: dL/dq = dz
  } else if (tokens) {
    ids = ids_in->contiguous();
    TORCH_CHECK_VALUE(ids.scalar_type() == at::kLong && ids.sizes() == at::IntArrayRef({B, T}),
                      "ids must be int64 [", B, ", ", T, "], got ", ids.scalar_type(), " ", ids.sizes());
    check_like("proj", proj_in, w_h, {proj_in.size(0), H});
  } else {
    check_like("proj", proj_in, w_h, {B, T, H});
  }
  // grad_out may be strided (the output is a transposed view); only its rows must be contiguous.
  const at::Tensor grad_out = grad_out_in.stride(2) == 1 ? grad_out_in : grad_out_in.contiguous();
  const int64_t go_sb = grad_out.stride(0), go_st = grad_out.stride(1);
  const at::Tensor proj = elman ? at::Tensor() : proj_in.contiguous();
  const int64_t block_rows = sum_block_rows(B), nblocks = (B + block_rows - 1) / block_rows;
  const int64_t V = tokens ? proj.size(0) : 0;
  // Token input with small tables: each block sums its dz rows per token into its own [V, H]
  // table; grad_U and the input's share of the weight gradient come from their sum after the
  // loop. Otherwise a second pass per step forms dp_t = c_t * (p_t > 0) and a_t = h_{t-1} + relu(p_t).
  const bool by_token = token_tables(tokens, V, B, T);
  // The chain's last product c_0 = dz_0 W_h feeds only grad_h0 (and the course's dp_0 without
  // token tables).
  const bool need_c0 = has_h0 || (!elman && !by_token);
  // The weight gradient's partner rows: the states h_{t-1} themselves (the elman cells; the
  // course's state share with token tables), or a_t = h_{t-1} + relu(p_t) formed per step.
  const bool states_partner = elman || by_token;
  // c_t = dz_t @ W_h on the panel products where they run (float32, AVX-512), else at::mm
  const at::Tensor packed_w_h = w_h.scalar_type() == at::kFloat && panel_products_here()
                                    ? pack_columns(w_h.contiguous(), false) : at::Tensor();
  // On the panel products, and for the elman cells (which return all of dz as grad_q), dz (and
  // the course's a) hold every step: the weight gradient sum_t dz_t^T a_t is one product after the
  // loop. Otherwise (at::mm, one step at a time) it is one GEMM per chunk of steps (at least
  // kGemmRows rows each), so dz and a need only a chunk's steps. Time-major like the states, so a
  // chunk's partner rows h_{t-1} are one contiguous block of out.
  const int64_t chunk = elman || packed_w_h.defined() ? T : std::min(T, std::max<int64_t>(1, (kGemmRows + B - 1) / B));
  at::Tensor dz = cached_empty({chunk, B, H}, out.options());  // dz_t = g_t * act'(h_t), slot t % chunk
  at::Tensor a = states_partner ? at::Tensor() : cached_empty({chunk, B, H}, out.options());
  at::Tensor grad_w_h = at::zeros({H, H}, out.options());
  at::Tensor sums = elman      ? at::Tensor()
                    : by_token ? at::zeros({nblocks, V, H}, out.options())  // per-block sums of dz by token
                               : cached_empty({B, T, H}, out.options());    // dL/dp_t = c_t * (p_t > 0)
  // per-block sums of dz, only where there is a bias to differentiate (never for the elman cells,
  // whose biases are in q)
  at::Tensor db_parts = has_bias ? at::zeros({nblocks, H}, out.options()) : at::Tensor();
  // h_0 is read without h0 only where the course forms a_0 = h_0 + relu(p_0)
  const at::Tensor h0 = has_h0 ? h0_in->contiguous() : states_partner ? at::Tensor() : at::zeros({B, H}, out.options());
  // the gradient at h_T (none: zeros)
  const at::Tensor grad_h_n = grad_h_n_in ? grad_h_n_in->contiguous() : at::Tensor();
  const at::Tensor states = out.view({T * B, H});
  at::Tensor grad_h0, grad_proj, grad_b_h;

  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "rnn_bwd", [&] {
    const scalar_t* go_p = grad_out.data_ptr<scalar_t>();
    const scalar_t* h0_p = h0.defined() ? h0.data_ptr<scalar_t>() : nullptr;
    const scalar_t* out_p = out.data_ptr<scalar_t>();
    const scalar_t* proj_p = elman ? nullptr : proj.data_ptr<scalar_t>();
    const scalar_t* ghn_p = grad_h_n.defined() ? grad_h_n.data_ptr<scalar_t>() : nullptr;
    const std::vector<scalar_t> zero_row(H, scalar_t(0));
    const int64_t* ids_p = tokens ? ids.data_ptr<int64_t>() : nullptr;
    scalar_t* dz_p = dz.data_ptr<scalar_t>();
    scalar_t* a_p = states_partner ? nullptr : a.data_ptr<scalar_t>();
    scalar_t* sums_p = elman ? nullptr : sums.data_ptr<scalar_t>();
    scalar_t* db_p = has_bias ? db_parts.data_ptr<scalar_t>() : nullptr;
    auto h_row = [&](int64_t t, int64_t b) { return t == 0 ? h0_p + b * H : out_p + ((t - 1) * B + b) * H; };  // h_t
    // dz_t's row b from the gradient at h_t (grad_out and the carry: c_{t+1}'s row in cn, or
    // grad_h_n's at t = T - 1); block k's sums
    auto gradient_row = [&](int64_t t, const scalar_t* cn, scalar_t* dz_t, int64_t b, int64_t k) {
      const scalar_t* carry = t < T - 1 ? cn + b * H : ghn_p != nullptr ? ghn_p + b * H : zero_row.data();
      Cell::gradient(go_p + b * go_sb + t * go_st, carry, h_row(t + 1, b), dz_t + b * H,
                     has_bias ? db_p + k * H : nullptr, H);
      if (by_token) add_into_row(dz_t + b * H, sums_p + (k * V + ids_p[b * T + t]) * H, H);
    };
    // the course's dp_t and a_t (in its slot of a) from the row's c_t
    auto input_row = [&](const scalar_t* c_p, int64_t b, int64_t t, int64_t slot) {
      const int64_t row = b * T + t;
      relu_grad_row(c_p + b * H, proj_p + (tokens ? ids_p[row] : row) * H, h_row(t, b), sums_p + row * H,
                    a_p + (slot * B + b) * H, H);
    };
    // c_{t+1} (the carry) and c_t: only two steps are ever live (the first reads grad_h_n).
    at::Tensor c_next = at::empty({B, H}, out.options()), c_t = at::empty({B, H}, out.options());
    // On the panel products every row's chain is independent of the other rows', so all T steps
    // of a set of rows run in one go, the sets in one parallel region (as the gated backward
    // does): the elman cells' rows per thread; the course's fixed blocks of rows, each with its
    // own partial sums (the bias's, the token tables'), so that their bits do not depend on the
    // thread count. dz (and the course's a) hold every step, so the weight gradient is one
    // product after the loop.
    if (packed_w_h.defined()) {
      const float* pk = packed_w_h.data_ptr<float>();
      scalar_t* const carry[2] = {c_next.data_ptr<scalar_t>(), c_t.data_ptr<scalar_t>()};
      auto all_steps = [&](int64_t b0, int64_t b1, int64_t k) {
        int live = 0;  // carry[live] holds c_{t+1} of these rows
        for (int64_t t = T - 1; t >= 0; --t) {
          scalar_t* dz_t = dz_p + t * B * H;
          const scalar_t* cn = carry[live];
          scalar_t* ct = carry[1 - live];
          for (int64_t b = b0; b < b1; ++b) gradient_row(t, cn, dz_t, b, k);
          if (t == 0 && !need_c0) break;
          rows_times_packed(dz_t, H, b0, b1, pk, H, ct, H, H);
          if (!states_partner) {
            for (int64_t b = b0; b < b1; ++b) input_row(ct, b, t, t);
          }
          live = 1 - live;
        }
      };
      if (elman) {
        for_each_thread_rows(B, [&](int64_t b0, int64_t b1) { all_steps(b0, b1, 0); });
      } else {
        for_each_block(B, block_rows, all_steps);
      }
      if ((T - 1 + (need_c0 ? 1 : 0)) % 2 == 1) std::swap(c_next, c_t);  // c_0 where every thread left it
      if (states_partner) {
        add_recurrent_weight_gradient(grad_w_h, dz, out, h0, has_h0);
      } else {
        add_weight_gradient(grad_w_h, dz.view({T * B, H}), a.view({T * B, H}));
      }
    } else {
      for (int64_t t = T - 1; t >= 0; --t) {
        const scalar_t* cn_p = c_next.data_ptr<scalar_t>();
        const int64_t first = t / chunk * chunk, slot = t - first;  // this step's chunk and place in it
        scalar_t* dz_t = dz_p + slot * B * H;
        for_each_row_by_block(B, [&](int64_t b, int64_t k) { gradient_row(t, cn_p, dz_t, b, k); }, block_rows);
        if (t > 0 || need_c0) {
          at::mm_out(c_t, dz[slot], w_h);  // c_t = dz_t @ W_h
          std::swap(c_next, c_t);
        }
        if (!states_partner) {
          const scalar_t* c_p = c_next.data_ptr<scalar_t>();
          for_each_row_by_block(B, [&](int64_t b, int64_t) { input_row(c_p, b, t, slot); });
        }
        if (slot == 0) {  // the chunk's steps first..min(T, first + chunk) - 1 are done
          const int64_t steps = std::min(T, first + chunk) - first;
          const at::Tensor dz_rows = dz.view({chunk * B, H}).narrow(0, 0, steps * B);
          if (states_partner) {
            // The states' share here (the course's input share after the loop): step t multiplies
            // h_t, which is out[t - 1], or h0 for t = 0 (nothing to add without h0).
            const int64_t lo = first == 0 ? 1 : 0;
            if (first == 0 && has_h0) add_weight_gradient(grad_w_h, dz[0], h0);  // (slot 0 is step 0 either way)
            if (steps > lo) {
              add_weight_gradient(grad_w_h, dz_rows.narrow(0, lo * B, (steps - lo) * B),
                                  states.narrow(0, (first + lo - 1) * B, (steps - lo) * B));
            }
          } else {
            add_weight_gradient(grad_w_h, dz_rows, a.view({chunk * B, H}).narrow(0, 0, steps * B));
          }
        }
      }
    }
    if (has_h0) grad_h0 = c_next;
    if (has_bias) {
      grad_b_h = at::empty({H}, out.options());
      sum_blocks(db_p, nblocks, H, grad_b_h.data_ptr<scalar_t>());
    }
    if (by_token) {
      at::Tensor dz_by_token = at::empty({V, H}, out.options());
      sum_blocks(sums_p, nblocks, V * H, dz_by_token.data_ptr<scalar_t>());
      add_weight_gradient(grad_w_h, dz_by_token, at::relu(proj));
      grad_proj = at::mm(dz_by_token, w_h);
      scalar_t* g_p = grad_proj.data_ptr<scalar_t>();
      for (int64_t i = 0; i < V * H; ++i) g_p[i] = proj_p[i] <= scalar_t(0) ? scalar_t(0) : g_p[i];
    }
  });

  if (elman) {
    grad_proj = dz;  // dL/dq_t = dz_t
  } else if (!by_token) {
    grad_proj = sums;
    if (tokens) {
      grad_proj = at::zeros_like(proj);
      grad_proj.index_add_(0, ids.view({B * T}), sums.view({B * T, H}));
    }
  }
  return {grad_proj, grad_w_h, has_bias ? c10::optional<at::Tensor>(grad_b_h) : c10::nullopt,
          has_h0 ? c10::optional<at::Tensor>(grad_h0) : c10::nullopt};
}

// The input projection inside the recurrence (rnn_fwd / rnn_bwd given w_in: the elman cells;
// gated_fwd / gated_bwd given w_ih): the input is the dense x [B, T, I] (batch-first or any
// strides, rows of unit stride) and q_t = x_t W_in^T + b is formed inside the time loop on the
// panel products (float32, AVX-512), so q is never written out and x is read where it lies (no
// transposed copy). The backward's dL/dq (every step, as the loops leave it) then gives
// dL/dx_t = dL/dq_t W_in, written batch-first, and dW_in = sum_t dL/dq_t^T x_t with db beside it,
// on the panel products too. Elsewhere (float64, no AVX-512, proj_size) q and those gradients are
// ATen products around the q path.
void check_dense_input(const at::Tensor& x, const at::Tensor& w_in, const c10::optional<at::Tensor>& b,
                       const c10::optional<at::Tensor>& ids, const at::Tensor& w_h) {
  TORCH_CHECK_VALUE(!ids, "the projection inside the recurrence takes dense input x [B, T, I], not ids");
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) > 0 && x.size(1) > 0,
                    "the projection inside the recurrence needs a non-empty x [B, T, I], got ", x.sizes());
  check_like("x", x, w_h, x.sizes());
  check_like("w_in", w_in, w_h, {w_h.size(0), x.size(2)});
  if (b) check_like("the input bias", *b, w_h, {w_h.size(0)});
}

// Whether products with w run on the panel products.
bool on_panels(const at::Tensor& w) { return w.scalar_type() == at::kFloat && panel_products_here(); }

// q [T, B, M] = x_t W_in^T + b (the path without the panel products)
at::Tensor input_projection(const at::Tensor& x, const at::Tensor& w_in, const c10::optional<at::Tensor>& b) {
  const at::Tensor q = at::matmul(x.transpose(0, 1), w_in.t());
  return (b ? q.add_(*b) : q).contiguous();
}

// The elman forward with the projection inside: per thread and step each tile is x_t W_in^T,
// then h_{t-1} W_h^T added to it, then the activation with b, for rows still in cache.
template <typename Cell>
at::Tensor elman_input_fwd(const at::Tensor& x_in, const at::Tensor& w_in, const c10::optional<at::Tensor>& b_in,
                           const at::Tensor& w_h, const c10::optional<at::Tensor>& h0_in) {
  const int64_t B = x_in.size(0), T = x_in.size(1), I = x_in.size(2), H = w_h.size(0);
  if (h0_in) check_like("h0", *h0_in, w_h, {B, H});
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const int64_t x_sb = x.stride(0), x_st = x.stride(1);
  const at::Tensor bias = b_in ? b_in->contiguous() : at::zeros({H}, w_h.options());
  const at::Tensor h0 = h0_in ? h0_in->contiguous() : at::Tensor();
  at::Tensor out = cached_empty({T, B, H}, w_h.options());
  const at::Tensor packed_h = pack_columns(w_h.contiguous(), true), packed_in = pack_columns(w_in.contiguous(), true);
  const float* ph = packed_h.data_ptr<float>();
  const float* pi = packed_in.data_ptr<float>();
  const float* x_p = x.data_ptr<float>();
  const float* b_p = bias.data_ptr<float>();
  const float* h0_p = h0_in ? h0.data_ptr<float>() : nullptr;
  float* out_p = out.data_ptr<float>();
  for_each_thread_rows(B, [&](int64_t b0, int64_t b1) {
    for (int64_t t = 0; t < T; ++t) {
      const float* hp = t == 0 ? h0_p : out_p + (t - 1) * B * H;  // null: h_0 = 0, no product
      float* ht = out_p + t * B * H;
      for (int64_t p = 0, c = 0; c < H; ++p, c += kPanelColumns) {
        for_each_row_call(b0, b1, kPanelRows, [&](int64_t b, int64_t rows) {
          panel_product<4, false>(x_p + b * x_sb + t * x_st, x_sb, rows, pi + p * I * kPanelColumns, I,
                                  ht + b * H + c, H, kLanes, H - c);
          if (hp != nullptr) {
            panel_product<4, false, true>(hp + b * H, H, rows, ph + p * H * kPanelColumns, H, ht + b * H + c, H,
                                          kLanes, H - c);
          }
        });
      }
      for (int64_t b = b0; b < b1; ++b) Cell::activate(ht + b * H, b_p, H);
    }
  });
  return out;
}

// (dL/dx [B, T, I], dW_in, db or undefined) from dz = dL/dq [T, B, M].
std::vector<at::Tensor> input_projection_bwd(const at::Tensor& dz, const at::Tensor& x_in, const at::Tensor& w_in,
                                             bool has_bias) {
  const int64_t T = dz.size(0), B = dz.size(1), H = dz.size(2), I = x_in.size(2);
  if (!on_panels(w_in)) {
    const at::Tensor x_rows = x_in.transpose(0, 1).reshape({T * B, I});
    return {at::matmul(dz, w_in).transpose(0, 1), dz.view({T * B, H}).t().mm(x_rows),
            has_bias ? dz.sum(at::IntArrayRef{0, 1}) : at::Tensor()};
  }
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  at::Tensor grad_x = cached_empty({B, T, I}, dz.options());
  const at::Tensor packed = pack_columns(w_in.contiguous(), false);  // (dz W_in)[:, col] = dz . W_in[:, col]
  const float* pk = packed.data_ptr<float>();
  const float* dz_p = dz.data_ptr<float>();
  float* gx_p = grad_x.data_ptr<float>();
  for_each_thread_rows(B, [&](int64_t b0, int64_t b1) {
    for (int64_t t = 0; t < T; ++t) {
      rows_times_packed(dz_p + t * B * H, H, b0, b1, pk, H, gx_p + t * I, T * I, I);
    }
  });
  at::Tensor grad_w = at::zeros({H, I}, dz.options());
  at::Tensor grad_b = has_bias ? at::zeros({H}, dz.options()) : at::Tensor();
  add_transposed_product(dz_p, H, x.data_ptr<float>(), x.stride(0), T * B, H, I, grad_w.data_ptr<float>(), I,
                         has_bias ? grad_b.data_ptr<float>() : nullptr, B, x.stride(1));
  return {grad_x, grad_w, grad_b};
}

// The course's token projection inside the recurrence (rnn_fwd / rnn_bwd given ids and w_in): proj
// is then the embedding E [V, E], and the [V, H] table the time loop reads is U = E_m W_in^T + b_in,
// E_m being E with the rows of tokens absent from ids zeroed: the reference loop never reads those
// rows, so a NaN or Inf there must not reach a gradient, as it would through dW_in = dU^T E (dU is
// zero there, and 0 * NaN is NaN). From the loop's dL/dU the backward gives dL/dE (zero on the
// absent rows), dW_in = dU^T E_m and db_in = dU's column sums. All of it is tiny ([V, E] x [E, H]);
// done here it saves the Python ops and autograd nodes around the call (benchmarks/RESULTS.md).
struct TokenTable {
  std::vector<char> occurs;  // whether each token occurs in ids
  at::Tensor embedding_m;    // E_m
  at::Tensor u;              // E_m W_in^T + b_in
};

// t's rows of the tokens absent from ids set to zero, in place (a select, not a product: 0 * NaN).
void zero_absent_rows(at::Tensor& t, const std::vector<char>& occurs) {
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "zero_absent_rows", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    const int64_t width = t.size(1);
    for (size_t v = 0; v < occurs.size(); ++v) {
      if (!occurs[v]) std::fill(p + v * width, p + (v + 1) * width, scalar_t(0));
    }
  });
}

at::Tensor panel_matmul(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, bool transpose_w);

// x W^T + b (transpose_w) or x W + b: on the panel products where they run (no thread wake-up
// of a BLAS library for these tiny products, no packing of x), else ATen's.
at::Tensor small_product(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                         bool transpose_w) {
  if (on_panels(w)) return panel_matmul(x, w, b, transpose_w);
  const at::Tensor wt = transpose_w ? w.t() : w;
  return b ? at::addmm(*b, x, wt) : at::mm(x, wt);
}

TokenTable token_table(const at::Tensor& embedding, const at::Tensor& ids_in, const at::Tensor& w_in,
                       const c10::optional<at::Tensor>& b_in, const at::Tensor& w_h) {
  TORCH_CHECK_VALUE(embedding.dim() == 2 && embedding.size(0) > 0,
                    "token input with w_in needs the embedding [V, E] as proj, got ", embedding.sizes());
  check_like("embedding", embedding, w_h, embedding.sizes());
  check_like("w_in", w_in, w_h, {w_h.size(0), embedding.size(1)});
  if (b_in) check_like("b_in", *b_in, w_h, {w_h.size(0)});
  TORCH_CHECK_TYPE(ids_in.scalar_type() == at::kLong, "ids must be int64, got ", ids_in.scalar_type());
  const at::Tensor ids = ids_in.contiguous();
  const int64_t V = embedding.size(0), n = ids.numel();
  const int64_t* ids_p = ids.data_ptr<int64_t>();
  TokenTable table{std::vector<char>(V, 0), embedding.clone(at::MemoryFormat::Contiguous), at::Tensor()};
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = ids_p[i];
    TORCH_CHECK_INDEX(v >= 0 && v < V, "token ids must lie in [0, ", V, "), got ", v);
    table.occurs[v] = 1;
  }
  zero_absent_rows(table.embedding_m, table.occurs);
  table.u = small_product(table.embedding_m, w_in, b_in, true);
  return table;
}

at::Tensor rnn_fwd(const at::Tensor& proj, const c10::optional<at::Tensor>& ids, const at::Tensor& w_h,
                   const c10::optional<at::Tensor>& b_h, const c10::optional<at::Tensor>& h0,
                   const std::string& cell, const c10::optional<at::Tensor>& w_in,
                   const c10::optional<at::Tensor>& b_in) {
  return with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    if (w_in && ids) {
      TORCH_CHECK_VALUE(Cell::kInputBeforeProduct, "ids with w_in are for the course cell, got cell '", cell, "'");
      check_weights(w_h);
      return rnn_fwd_cell<Cell>(token_table(proj, *ids, *w_in, b_in, w_h).u, ids, w_h, b_h, h0, /*ids_checked=*/true);
    }
    TORCH_CHECK_VALUE(!b_in, "b_in goes with the course's token input (ids and w_in)");
    if (w_in) {
      TORCH_CHECK_VALUE(!Cell::kInputBeforeProduct, "w_in with dense input is for the elman cells, got cell '",
                        cell, "'");
      check_weights(w_h);
      check_dense_input(proj, *w_in, b_h, ids, w_h);
      if (on_panels(w_h)) return elman_input_fwd<Cell>(proj, *w_in, b_h, w_h, h0);
      return rnn_fwd_cell<Cell>(input_projection(proj, *w_in, b_h), c10::nullopt, w_h, c10::nullopt, h0);
    }
    return rnn_fwd_cell<Cell>(proj, ids, w_h, b_h, h0);
  });
}

std::vector<c10::optional<at::Tensor>> rnn_bwd(const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_h_n,
                                               const at::Tensor& out, const c10::optional<at::Tensor>& h0,
                                               const at::Tensor& proj, const c10::optional<at::Tensor>& ids,
                                               const at::Tensor& w_h, bool has_bias, const std::string& cell,
                                               const c10::optional<at::Tensor>& w_in,
                                               const c10::optional<at::Tensor>& b_in) {
  return with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    if (w_in && ids) {  // the course's token input: the table recomputed (the same bits as the forward's)
      TORCH_CHECK_VALUE(Cell::kInputBeforeProduct, "ids with w_in are for the course cell, got cell '", cell, "'");
      check_weights(w_h);
      const TokenTable table = token_table(proj, *ids, *w_in, b_in, w_h);
      std::vector<c10::optional<at::Tensor>> grads = rnn_bwd_cell<Cell>(grad_out, grad_h_n, out, h0, table.u, ids,
                                                                        w_h, has_bias);
      const at::Tensor grad_u = *grads[0];
      at::Tensor grad_embedding = small_product(grad_u, *w_in, c10::nullopt, false);
      zero_absent_rows(grad_embedding, table.occurs);
      at::Tensor grad_w_in = at::zeros_like(*w_in);
      at::Tensor grad_b_in = b_in ? at::zeros_like(*b_in) : at::Tensor();
      add_weight_gradient(grad_w_in, grad_u, table.embedding_m, b_in ? &grad_b_in : nullptr);
      grads[0] = grad_embedding;
      grads.emplace_back(grad_w_in);
      grads.emplace_back(b_in ? c10::make_optional(grad_b_in) : c10::nullopt);
      return grads;
    }
    TORCH_CHECK_VALUE(!b_in, "b_in goes with the course's token input (ids and w_in)");
    if (!w_in) {
      std::vector<c10::optional<at::Tensor>> grads = rnn_bwd_cell<Cell>(grad_out, grad_h_n, out, h0, proj, ids, w_h,
                                                                        has_bias);
      grads.resize(6);  // no grad_w_in, grad_b_in
      return grads;
    }
    TORCH_CHECK_VALUE(!Cell::kInputBeforeProduct, "w_in with dense input is for the elman cells, got cell '", cell,
                      "'");
    check_weights(w_h);
    check_dense_input(proj, *w_in, c10::nullopt, ids, w_h);
    std::vector<c10::optional<at::Tensor>> grads = rnn_bwd_cell<Cell>(grad_out, grad_h_n, out, h0, proj, ids, w_h,
                                                                      false);
    const std::vector<at::Tensor> input = input_projection_bwd(*grads[0], proj, *w_in, has_bias);
    return std::vector<c10::optional<at::Tensor>>{
        input[0], grads[1], has_bias ? c10::make_optional(input[2]) : c10::nullopt, grads[3], input[1], c10::nullopt};
  });
}

// A gated weight [G*H, K] packed for y = x W^T in panels of all G gates of 16 units (column v of
// panel p: gate v / 16 of unit 16 p + v % 16).
at::Tensor pack_gate_panels(const at::Tensor& w, int64_t G) {
  const int64_t H = w.size(0) / G, K = w.size(1);
  const float* w_p = w.data_ptr<float>();
  return pack_panels(
      (H + kLanes - 1) / kLanes, G, K,
      [&](int64_t p, int64_t v) {
        const int64_t unit = p * kLanes + v % kLanes;
        return unit < H ? (v / kLanes) * H + unit : int64_t(-1);
      },
      [&](int64_t row, int64_t k) { return w_p[row * K + k]; });
}

// A gated step's input q_t: the rows of q [T, B, G*H], or x_t W_ih^T + bias formed inside the
// loop (x [B, T, I] rows x_sb apart by batch, x_st by step; W_ih packed like W_hh; `q` the bias
// row [G*H]): then no [T, B, G*H] tensor is written and read back.
struct GatedInput {
  const float* q;
  const float* x = nullptr;
  int64_t I = 0;
  const float* packed_w_ih = nullptr;
  int64_t x_sb = 0, x_st = 0;
};

// The gated forward on panel products (see "Panel products"; float32, P == H): each thread runs
// all T steps on its rows; per step and panel of 16 units, the tile a = h_{t-1} W_hh^T (+ x_t W_ih^T)
// of those units' G gates, then the cell's pointwise step on it.
template <typename Cell>
void gated_fwd_panels(const GatedInput& input, const at::Tensor& w_hh, const at::Tensor& b_hh, const at::Tensor& h0,
                      bool has_h0, const at::Tensor& c0, at::Tensor& out, at::Tensor& cs, at::Tensor& saved,
                      int64_t saved_step) {
  constexpr int64_t G = Cell::kGates, rows_per_call = kAccumulators / G, width = G * kLanes;
  const int64_t GH = w_hh.size(0), H = GH / G, T = out.size(0), B = out.size(1), I = input.I;
  const int64_t panels = (H + kLanes - 1) / kLanes;
  const at::Tensor packed = pack_gate_panels(w_hh, G);
  const float* pk = packed.data_ptr<float>();
  const float* b_p = b_hh.data_ptr<float>();
  const float* h0_p = h0.data_ptr<float>();
  const float* c0_p = c0.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  float* cs_p = cs.data_ptr<float>();
  float* saved_p = saved.data_ptr<float>();
  for_each_thread_rows(B, [&](int64_t b0, int64_t b1) {
    // a = h_{t-1} W_hh^T (+ x_t W_ih^T) of up to kGroupRows rows at a time, as the [rows, G*H]
    // rows the pointwise step reads (each panel then serves several kernel calls from L1).
    constexpr int64_t kGroupRows = 4 * rows_per_call;
    std::vector<float> a(kGroupRows * GH), q(input.x != nullptr ? kGroupRows * GH : 0);
    for (int64_t t = 0; t < T; ++t) {
      const float* hp = t == 0 ? h0_p : out_p + (t - 1) * B * H;
      const float* cp = t == 0 ? c0_p : cs_p + (t - 1) * B * H;
      const bool recurrent = t > 0 || has_h0;  // h_0 = 0: no product
      for (int64_t g0 = b0; g0 < b1; g0 += kGroupRows) {
        const int64_t g1 = std::min(b1, g0 + kGroupRows);
        if (!recurrent) std::fill(a.begin(), a.begin() + (g1 - g0) * GH, 0.0f);
        for (int64_t p = 0; p < panels; ++p) {
          const int64_t u = p * kLanes;
          for_each_row_call(g0, g1, rows_per_call, [&](int64_t b, int64_t rows) {
            if (input.x != nullptr) {  // q_t = x_t W_ih^T + bias
              panel_product<G, true>(input.x + b * input.x_sb + t * input.x_st, input.x_sb, rows,
                                     input.packed_w_ih + p * I * width, I,
                                     q.data() + (b - g0) * GH + u, GH, H, H - u, input.q + u);
            }
            if (recurrent) {
              panel_product<G, true>(hp + b * H, H, rows, pk + p * H * width, H, a.data() + (b - g0) * GH + u, GH, H,
                                     H - u);
            }
          });
        }
        for (int64_t b = g0; b < g1; ++b) {
          const int64_t at = (t * B + b) * H;
          const float* q_row = input.x != nullptr ? q.data() + (b - g0) * GH : input.q + (t * B + b) * GH;
          Cell::forward_row(a.data() + (b - g0) * GH, q_row, b_p, hp + b * H, cp + b * H, out_p + at, cs_p + at,
                            saved_p + t * saved_step + b * 4 * H, H);
        }
      }
    }
  });
}

// The gated backward on panel products (float32, P == H): each thread runs all T steps on its
// rows; per step the pointwise backward of each row, then the carry into h_{t-1},
// da_t W_hh (+ the GRU's direct share), per panel of 64 of its columns. carry [2, B, H] zeros on
// entry: the carry into h_t in slot (t + 1) % 2; on exit slot 0 holds dL/dh0 (if has_h0).
template <typename Cell>
void gated_bwd_panels(const at::Tensor& grad_out, const at::Tensor& grad_cs, int64_t gcs_step, const at::Tensor& out,
                      const at::Tensor& cs, const at::Tensor& saved, const at::Tensor& w_hh, const at::Tensor& h0,
                      const at::Tensor& c0, bool has_h0, at::Tensor& grad_q, at::Tensor& da, at::Tensor& carry_c,
                      at::Tensor& carry) {
  constexpr int64_t NV = 4, width = NV * kLanes, rows_per_call = kAccumulators / NV;
  const int64_t GH = w_hh.size(0), H = GH / Cell::kGates, T = out.size(0), B = out.size(1);
  const int64_t panels = (H + width - 1) / width;
  const at::Tensor packed = pack_columns(w_hh, false);  // (da W_hh)[:, col] = da . W_hh[:, col]
  const float* pk = packed.data_ptr<float>();
  const float* go_p = grad_out.data_ptr<float>();
  const float* gcs_p = grad_cs.data_ptr<float>();
  const float* out_p = out.data_ptr<float>();
  const float* cs_p = cs.data_ptr<float>();
  const float* saved_p = saved.data_ptr<float>();
  const float* h0_p = h0.data_ptr<float>();
  const float* c0_p = c0.data_ptr<float>();
  float* dq_p = grad_q.data_ptr<float>();
  float* da_p = da.data_ptr<float>();
  float* cc_p = carry_c.data_ptr<float>();
  float* carry_p = carry.data_ptr<float>();
  for_each_thread_rows(B, [&](int64_t b0, int64_t b1) {
    for (int64_t t = T - 1; t >= 0; --t) {
      const float* hp = t == 0 ? h0_p : out_p + (t - 1) * B * H;
      const float* cp = t == 0 ? c0_p : cs_p + (t - 1) * B * H;
      const float* carry_in = carry_p + ((t + 1) % 2) * B * H;
      float* carry_out = carry_p + (t % 2) * B * H;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t at = t * B + b;
        Cell::backward_row(go_p + at * H, carry_in + b * H, gcs_p + t * gcs_step + b * H, saved_p + at * 4 * H,
                           cp + b * H, cs_p + at * H, hp + b * H, dq_p + at * GH, da_p + at * GH, cc_p + b * H,
                           carry_out + b * H, H);
      }
      if (t == 0 && !has_h0) continue;  // c_0 feeds only grad_h0
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t c = p * width;
        for_each_row_call(b0, b1, rows_per_call, [&](int64_t b, int64_t rows) {
          // The GRU adds to its direct share g z, already in carry_out.
          panel_product<NV, false, Cell::kSeparateDa>(da_p + (t * B + b) * GH, GH, rows, pk + p * GH * width, GH,
                                               carry_out + b * H + c, H, kLanes, H - c);
        });
      }
    }
  });
}

// The gated cells' forward: gated_fwd(q [T, B, G*H], w_hh [G*H, P], b_hh, h0 [B, P], c0 [B, H], w_hr
// [P, H]) -> (out [T, B, P], cs [T, B, H] (LSTM; else empty), saved [T, B, 4H]); see
// fused_rnn/ops/__init__.py. Per step one GEMM a = h_{t-1} W_hh^T over the whole batch, the cell's
// pointwise pass over batch rows, and (proj_size) h_t = m_t W_hr^T.
template <typename Cell>
std::vector<at::Tensor> gated_fwd_cell(const at::Tensor& q_in, const at::Tensor& w_hh,
                                       const c10::optional<at::Tensor>& b_hh_in, const c10::optional<at::Tensor>& h0_in,
                                       const c10::optional<at::Tensor>& c0_in, const c10::optional<at::Tensor>& w_hr_in,
                                       bool keep_saved) {
  TORCH_CHECK_TYPE(w_hh.scalar_type() == at::kFloat || w_hh.scalar_type() == at::kDouble,
                   "the cpu backend supports float32 and float64, got ", w_hh.scalar_type());
  TORCH_CHECK_VALUE(w_hh.device().is_cpu() && w_hh.dim() == 2 && w_hh.size(0) % Cell::kGates == 0 && w_hh.size(0) > 0,
                    "w_hh must be a CPU tensor [G*H, P], got ", w_hh.sizes());
  const int64_t GH = w_hh.size(0), H = GH / Cell::kGates, P = w_hh.size(1);
  TORCH_CHECK_VALUE(q_in.dim() == 3 && q_in.size(2) == GH, "q must be [T, B, ", GH, "], got ", q_in.sizes());
  const int64_t T = q_in.size(0), B = q_in.size(1);
  TORCH_CHECK_VALUE(B > 0 && T > 0, "empty batch or sequence: B=", B, ", T=", T);
  check_like("q", q_in, w_hh, q_in.sizes());
  const bool proj = w_hr_in.has_value();
  TORCH_CHECK_VALUE(proj ? Cell::kCellState : P == H, "w_hh must be [G*H, H] without a projection, got ", w_hh.sizes());
  if (proj) check_like("w_hr", *w_hr_in, w_hh, {P, H});
  if (b_hh_in) check_like("b_hh", *b_hh_in, w_hh, {GH});
  if (h0_in) check_like("h0", *h0_in, w_hh, {B, P});
  if (c0_in) check_like("c0", *c0_in, w_hh, {B, H});
  const at::Tensor q = q_in.contiguous();
  const at::Tensor b_hh = b_hh_in ? b_hh_in->contiguous() : at::zeros({GH}, w_hh.options());
  const at::Tensor h0 = h0_in ? h0_in->contiguous() : at::zeros({B, P}, w_hh.options());
  const at::Tensor c0 = c0_in ? c0_in->contiguous() : at::zeros({B, H}, w_hh.options());
  at::Tensor out = cached_empty({T, B, P}, w_hh.options());
  at::Tensor cs = Cell::kCellState ? cached_empty({T, B, H}, w_hh.options()) : at::empty({0}, w_hh.options());
  // Without a backward to come (inference), the gates go to one step's scratch rows instead of
  // [T, B, 4H] (4x the output's memory traffic and page faults).
  at::Tensor saved = cached_empty(keep_saved ? at::IntArrayRef{T, B, 4 * H} : at::IntArrayRef{B, 4 * H}, w_hh.options());
  const int64_t saved_step = keep_saved ? B * 4 * H : 0;
  at::Tensor m = proj ? at::empty({B, H}, w_hh.options()) : at::Tensor();

  if (w_hh.scalar_type() == at::kFloat && !proj && panel_products_here()) {
    gated_fwd_panels<Cell>(GatedInput{q.data_ptr<float>()}, w_hh.contiguous(), b_hh, h0, h0_in.has_value(), c0,
                           out, cs, saved, saved_step);
    return {out, cs, keep_saved ? saved : at::empty({0}, w_hh.options())};
  }
  const StepProduct recurrent(w_hh, B);  // a = h_{t-1} W_hh^T
  at::Tensor a = recurrent.packed() ? at::Tensor() : at::empty({B, GH}, w_hh.options());  // the fallback's output
  const c10::optional<StepProduct> projection = proj ? c10::make_optional(StepProduct(*w_hr_in, B)) : c10::nullopt;
  AT_DISPATCH_FLOATING_TYPES(w_hh.scalar_type(), "gated_fwd", [&] {
    const scalar_t* q_p = q.data_ptr<scalar_t>();
    const scalar_t* b_p = b_hh.data_ptr<scalar_t>();
    scalar_t* out_p = out.data_ptr<scalar_t>();
    scalar_t* cs_p = cs.data_ptr<scalar_t>();
    scalar_t* saved_p = saved.data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      const at::Tensor h_prev = t == 0 ? h0 : out[t - 1];
      const scalar_t* hp_p = h_prev.data_ptr<scalar_t>();
      const scalar_t* cp_p = t == 0 ? c0.data_ptr<scalar_t>() : cs_p + (t - 1) * B * H;
      scalar_t* h_p = proj ? m.data_ptr<scalar_t>() : out_p + t * B * P;
      const at::Tensor a_t = recurrent(h_prev, a);  // kept alive while its rows are read
      const scalar_t* a_p = a_t.data_ptr<scalar_t>();
      for_each_row_by_block(B, [&](int64_t b, int64_t) {
        Cell::forward_row(a_p + b * GH, q_p + (t * B + b) * GH, b_p, hp_p + b * P, cp_p + b * H, h_p + b * H,
                          cs_p + (t * B + b) * H, saved_p + t * saved_step + b * 4 * H, H);
      });
      if (proj) {
        at::Tensor out_t = out[t];
        const at::Tensor h_t = (*projection)(m, out_t);
        if (!h_t.is_same(out_t)) out_t.copy_(h_t);
      }
    }
  });
  return {out, cs, keep_saved ? saved : at::empty({0}, w_hh.options())};
}

// The gated cells' backward: gated_bwd(grad_out [T, B, P], grad_cs [T, B, H] or None, out, cs,
// saved, w_hh, has_hidden_bias, h0, c0, w_hr) -> (grad_q, grad_w_hh, grad_b_hh, grad_h0, grad_c0,
// grad_w_hr), the absent ones None. Per step the pointwise pass (dq, and the GRU's da), then the
// carry c = da_t W_hh for step t-1; the weight gradient sum_t da_t^T h_{t-1} is two GEMMs after
// the loop (da holds every step: it is grad_q, or for the GRU a buffer beside it).
template <typename Cell>
std::vector<c10::optional<at::Tensor>> gated_bwd_cell(const at::Tensor& grad_out_in,
                                                      const c10::optional<at::Tensor>& grad_cs_in,
                                                      const at::Tensor& out, const at::Tensor& cs,
                                                      const at::Tensor& saved, const at::Tensor& w_hh,
                                                      bool has_hidden_bias, const c10::optional<at::Tensor>& h0_in,
                                                      const c10::optional<at::Tensor>& c0_in,
                                                      const c10::optional<at::Tensor>& w_hr_in) {
  const int64_t GH = w_hh.size(0), H = GH / Cell::kGates, P = w_hh.size(1);
  const int64_t T = out.size(0), B = out.size(1);
  check_like("out", out, w_hh, {T, B, P});
  check_like("saved", saved, w_hh, {T, B, 4 * H});
  check_like("grad_out", grad_out_in, w_hh, {T, B, P});
  if (Cell::kCellState) check_like("cs", cs, w_hh, {T, B, H});
  if (grad_cs_in) check_like("grad_cs", *grad_cs_in, w_hh, {T, B, H});
  const bool proj = w_hr_in.has_value(), has_h0 = h0_in.has_value();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor grad_cs = grad_cs_in ? grad_cs_in->contiguous() : at::zeros({1, B, H}, w_hh.options());
  const int64_t gcs_step = grad_cs_in ? B * H : 0;  // None: every step reads the same zeros
  const at::Tensor h0 = has_h0 ? h0_in->contiguous() : at::zeros({B, P}, w_hh.options());
  const at::Tensor c0 = c0_in ? c0_in->contiguous() : at::zeros({B, H}, w_hh.options());
  at::Tensor grad_q = cached_empty({T, B, GH}, w_hh.options());
  at::Tensor da = Cell::kSeparateDa ? cached_empty({T, B, GH}, w_hh.options()) : grad_q;
  at::Tensor carry_h = at::zeros({B, P}, w_hh.options()), carry_next = at::empty({B, P}, w_hh.options());
  at::Tensor carry_c = at::zeros({B, H}, w_hh.options());
  at::Tensor zeros_row = proj ? at::zeros({B, H}, w_hh.options()) : at::Tensor();  // the carry once gm holds it
  at::Tensor gh = proj ? at::empty({B, P}, w_hh.options()) : at::Tensor();
  at::Tensor gm = proj ? at::empty({B, H}, w_hh.options()) : at::Tensor();
  at::Tensor m = proj ? at::empty({B, H}, w_hh.options()) : at::Tensor();
  at::Tensor grad_w_hr = proj ? at::zeros({P, H}, w_hh.options()) : at::Tensor();

  if (w_hh.scalar_type() == at::kFloat && !proj && panel_products_here()) {
    at::Tensor carry = at::zeros({2, B, P}, w_hh.options());
    gated_bwd_panels<Cell>(grad_out, grad_cs, gcs_step, out.contiguous(), cs.contiguous(), saved.contiguous(),
                           w_hh.contiguous(), h0, c0, has_h0, grad_q, da, carry_c, carry);
    carry_h = carry[0];
  } else {
    const StepProduct carry_product(w_hh.t(), B);  // da_t W_hh, the carry to h_{t-1}
    const c10::optional<StepProduct> projection_back =
        proj ? c10::make_optional(StepProduct(w_hr_in->t(), B)) : c10::nullopt;  // gh W_hr
    at::Tensor product_buf = at::empty({B, P}, w_hh.options());  // where the fallback writes da_t W_hh
    AT_DISPATCH_FLOATING_TYPES(w_hh.scalar_type(), "gated_bwd", [&] {
      const scalar_t* go_p = grad_out.data_ptr<scalar_t>();
      const scalar_t* gcs_p = grad_cs.data_ptr<scalar_t>();
      const scalar_t* out_p = out.data_ptr<scalar_t>();
      const scalar_t* cs_p = cs.data_ptr<scalar_t>();
      const scalar_t* saved_p = saved.data_ptr<scalar_t>();
      const scalar_t* h0_p = h0.data_ptr<scalar_t>();
      const scalar_t* c0_p = c0.data_ptr<scalar_t>();
      scalar_t* dq_p = grad_q.data_ptr<scalar_t>();
      scalar_t* da_p = da.data_ptr<scalar_t>();
      scalar_t* cc_p = carry_c.data_ptr<scalar_t>();
      for (int64_t t = T - 1; t >= 0; --t) {
        const scalar_t* hp_p = t == 0 ? h0_p : out_p + (t - 1) * B * P;
        const scalar_t* cp_p = t == 0 ? c0_p : cs_p + (t - 1) * B * H;
        const scalar_t* sv_p = saved_p + t * B * 4 * H;
        // The gradient at the cell's own state: go + carry, or (proj_size) gm = (go + carry) W_hr.
        const scalar_t* g_p = go_p + t * B * P;
        const scalar_t* carry_p = carry_h.data_ptr<scalar_t>();
        at::Tensor gm_t;  // gm, kept alive while its rows are read
        if (proj) {
          scalar_t* gh_p = gh.data_ptr<scalar_t>();
          scalar_t* m_p = m.data_ptr<scalar_t>();
          for_each_row_by_block(B, [&](int64_t b, int64_t) {
            add_rows(g_p + b * P, carry_p + b * P, gh_p + b * P, P);
            lstm_m_row(sv_p + b * 4 * H, cs_p + (t * B + b) * H, m_p + b * H, H);
          });
          add_weight_gradient(grad_w_hr, gh, m);  // h_t = m_t W_hr^T
          gm_t = (*projection_back)(gh, gm);
          g_p = gm_t.data_ptr<scalar_t>();
          carry_p = zeros_row.data_ptr<scalar_t>();
        }
        const int64_t g_stride = proj ? H : P;
        scalar_t* direct_p = carry_next.data_ptr<scalar_t>();
        for_each_row_by_block(B, [&](int64_t b, int64_t) {
          Cell::backward_row(g_p + b * g_stride, carry_p + b * g_stride, gcs_p + t * gcs_step + b * H, sv_p + b * 4 * H,
                             cp_p + b * H, cs_p + (t * B + b) * H, hp_p + b * P, dq_p + (t * B + b) * GH,
                             da_p + (t * B + b) * GH, cc_p + b * H, direct_p + b * P, H);
        });
        if (t > 0 || has_h0) {  // c_0 feeds only grad_h0
          const at::Tensor product = carry_product(da[t], product_buf);
          if (Cell::kSeparateDa) {
            carry_next.add_(product);  // the GRU's direct share g z is in carry_next already
            std::swap(carry_h, carry_next);
          } else if (product.is_same(product_buf)) {
            std::swap(carry_h, product_buf);
          } else {
            carry_h = product;
          }
        }
      }
    });
  }
  // dW_hh = sum_t da_t^T h_{t-1}, and db_hh = sum_t da_t summed with it.
  at::Tensor grad_w_hh = at::zeros({GH, P}, w_hh.options());
  at::Tensor grad_b = has_hidden_bias ? at::zeros({GH}, w_hh.options()) : at::Tensor();
  add_recurrent_weight_gradient(grad_w_hh, da, out, h0, has_h0, has_hidden_bias ? &grad_b : nullptr);
  c10::optional<at::Tensor> grad_b_hh, grad_h0, grad_c0, grad_w_hr_out;
  if (has_hidden_bias) grad_b_hh = grad_b;
  grad_h0 = has_h0 ? carry_h : at::zeros({B, P}, w_hh.options());
  if (Cell::kCellState) grad_c0 = carry_c;
  if (proj) grad_w_hr_out = grad_w_hr;
  return {grad_q, grad_w_hh, grad_b_hh, grad_h0, grad_c0, grad_w_hr_out};
}

// The gated cells' forward with the input projection inside the time loop (float32, panel
// products here, no proj_size): x [B, T, I] read where it lies, w_ih [G*H, I], bias [G*H] (the
// biases that fold into q) or None; (out, cs, saved) as gated_fwd_cell's, without the
// [T, B, G*H] q between a projection GEMM and the loop.
template <typename Cell>
std::vector<at::Tensor> gated_fwd_inside(const at::Tensor& x_in, const at::Tensor& w_ih_in,
                                         const c10::optional<at::Tensor>& bias_in, const at::Tensor& w_hh_in,
                                         const c10::optional<at::Tensor>& b_hh_in,
                                         const c10::optional<at::Tensor>& h0_in,
                                         const c10::optional<at::Tensor>& c0_in, bool keep_saved) {
  const int64_t GH = w_hh_in.size(0), H = GH / Cell::kGates;
  const int64_t B = x_in.size(0), T = x_in.size(1), I = x_in.size(2);
  if (b_hh_in) check_like("b_hh", *b_hh_in, w_hh_in, {GH});
  if (h0_in) check_like("h0", *h0_in, w_hh_in, {B, H});
  if (c0_in) check_like("c0", *c0_in, w_hh_in, {B, H});
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous(), w_hh = w_hh_in.contiguous();
  const at::Tensor bias = bias_in ? bias_in->contiguous() : at::zeros({GH}, w_hh.options());
  const at::Tensor b_hh = b_hh_in ? b_hh_in->contiguous() : at::zeros({GH}, w_hh.options());
  const at::Tensor h0 = h0_in ? h0_in->contiguous() : at::zeros({B, H}, w_hh.options());
  const at::Tensor c0 = c0_in ? c0_in->contiguous() : at::zeros({B, H}, w_hh.options());
  at::Tensor out = cached_empty({T, B, H}, w_hh.options());
  at::Tensor cs = Cell::kCellState ? cached_empty({T, B, H}, w_hh.options()) : at::empty({0}, w_hh.options());
  // Without a backward to come (inference), the gates go to one step's scratch rows.
  at::Tensor saved = cached_empty(keep_saved ? at::IntArrayRef{T, B, 4 * H} : at::IntArrayRef{B, 4 * H}, w_hh.options());
  const at::Tensor packed_w_ih = pack_gate_panels(w_ih_in.contiguous(), Cell::kGates);
  const GatedInput input{bias.data_ptr<float>(), x.data_ptr<float>(), I, packed_w_ih.data_ptr<float>(), x.stride(0),
                         x.stride(1)};
  gated_fwd_panels<Cell>(input, w_hh, b_hh, h0, h0_in.has_value(), c0, out, cs, saved, keep_saved ? B * 4 * H : 0);
  return {out, cs, keep_saved ? saved : at::empty({0}, w_hh.options())};
}

// gated_fwd(q, ...), or with w_ih: q is the dense input x [B, T, I] and b_ih the bias that folds
// into q = x W_ih^T + b_ih, formed inside the loop on the panel products (else by at::matmul).
std::vector<at::Tensor> gated_fwd(const at::Tensor& q, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh,
                                  const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& c0,
                                  const c10::optional<at::Tensor>& w_hr, const std::string& cell, bool keep_saved,
                                  const c10::optional<at::Tensor>& w_ih, const c10::optional<at::Tensor>& b_ih) {
  return with_gated_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    if (!w_ih) return gated_fwd_cell<Cell>(q, w_hh, b_hh, h0, c0, w_hr, keep_saved);
    TORCH_CHECK_TYPE(w_hh.scalar_type() == at::kFloat || w_hh.scalar_type() == at::kDouble,
                     "the cpu backend supports float32 and float64, got ", w_hh.scalar_type());
    TORCH_CHECK_VALUE(w_hh.device().is_cpu() && w_hh.dim() == 2 && w_hh.size(0) % Cell::kGates == 0 &&
                          w_hh.size(0) > 0,
                      "w_hh must be a CPU tensor [G*H, P], got ", w_hh.sizes());
    check_dense_input(q, *w_ih, b_ih, c10::nullopt, w_hh);
    if (on_panels(w_hh) && !w_hr && w_hh.size(0) == Cell::kGates * w_hh.size(1)) {
      return gated_fwd_inside<Cell>(q, *w_ih, b_ih, w_hh, b_hh, h0, c0, keep_saved);
    }
    return gated_fwd_cell<Cell>(input_projection(q, *w_ih, b_ih), w_hh, b_hh, h0, c0, w_hr, keep_saved);
  });
}

std::vector<c10::optional<at::Tensor>> gated_bwd(const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_cs,
                                                 const at::Tensor& out, const at::Tensor& cs, const at::Tensor& saved,
                                                 const at::Tensor& w_hh, bool has_hidden_bias,
                                                 const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& c0,
                                                 const c10::optional<at::Tensor>& w_hr, const std::string& cell,
                                                 const c10::optional<at::Tensor>& x,
                                                 const c10::optional<at::Tensor>& w_ih, bool has_input_bias) {
  return with_gated_cell(cell, [&](auto c) {
    std::vector<c10::optional<at::Tensor>> grads =
        gated_bwd_cell<decltype(c)>(grad_out, grad_cs, out, cs, saved, w_hh, has_hidden_bias, h0, c0, w_hr);
    if (!w_ih) {
      grads.resize(8);
      return grads;
    }
    TORCH_CHECK_VALUE(x.has_value(), "gated_bwd with w_ih needs x");
    check_dense_input(*x, *w_ih, c10::nullopt, c10::nullopt, w_hh);
    const std::vector<at::Tensor> input = input_projection_bwd(*grads[0], *x, *w_ih, has_input_bias);
    grads[0] = input[0];
    grads.emplace_back(input[1]);
    grads.emplace_back(has_input_bias ? c10::make_optional(input[2]) : c10::nullopt);
    return grads;
  });
}

// Switches the panel products on or off (tests and benchmarks compare both paths); returns
// whether they were on.
bool use_panel_products(bool on) {
  const bool was = panel_products_on;
  panel_products_on = on;
  return was;
}

// y = x W^T + b (transpose_w) or x W (+ b) for float32 x [N, K] on the panel products: the dense
// cells' input projection and its backward's x gradient (fused_rnn/ops/projection.py). W is
// packed once per call into panels of 64 output columns; each thread takes blocks of rows and
// runs every panel over a block (the block's rows stay in L2, each panel in L1/L2).
at::Tensor panel_matmul(const at::Tensor& x_in, const at::Tensor& w_in, const c10::optional<at::Tensor>& b_in,
                        bool transpose_w) {
  TORCH_CHECK_VALUE(panel_products_here(), "panel_matmul needs a CPU with AVX-512 (and the panel products on)");
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat && w_in.scalar_type() == at::kFloat,
                   "panel_matmul takes float32, got ", x_in.scalar_type(), " and ", w_in.scalar_type());
  TORCH_CHECK_VALUE(x_in.dim() == 2 && w_in.dim() == 2 && x_in.device().is_cpu() && w_in.device().is_cpu(),
                    "panel_matmul takes 2-d CPU tensors, got ", x_in.sizes(), " and ", w_in.sizes());
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t N = x.size(0), K = x.size(1), M = transpose_w ? w.size(0) : w.size(1);
  TORCH_CHECK_VALUE((transpose_w ? w.size(1) : w.size(0)) == K, "panel_matmul: x ", x.sizes(), " and w ", w.sizes(),
                    transpose_w ? " (transposed)" : "", " do not multiply");
  at::Tensor b;
  if (b_in) {
    b = b_in->contiguous();
    TORCH_CHECK_VALUE(b.scalar_type() == at::kFloat && b.dim() == 1 && b.size(0) == M, "panel_matmul: bias must be float32 [",
                      M, "], got ", b.sizes());
  }
  at::Tensor y = cached_empty({N, M}, x.options());
  if (N == 0 || M == 0) return y;
  if (K == 0) return b.defined() ? y.copy_(b.expand({N, M})) : y.zero_();
  constexpr int64_t NV = 4, width = NV * kLanes, rows_per_call = kAccumulators / NV, block_rows = 32 * rows_per_call;
  const int64_t panels = (M + width - 1) / width;
  const at::Tensor packed = pack_columns(w, transpose_w);
  const float* pk = packed.data_ptr<float>();
  const float* x_p = x.data_ptr<float>();
  const float* b_p = b.defined() ? b.data_ptr<float>() : nullptr;
  float* y_p = y.data_ptr<float>();
  at::parallel_for(0, (N + block_rows - 1) / block_rows, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t blk = k0; blk < k1; ++blk) {
      const int64_t r0 = blk * block_rows, r1 = std::min(N, r0 + block_rows);
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t c = p * width;
        for_each_row_call(r0, r1, rows_per_call, [&](int64_t r, int64_t rows) {
          panel_product<NV, false>(x_p + r * K, K, rows, pk + p * K * width, K, y_p + r * M + c, M, kLanes, M - c,
                                   b_p ? b_p + c : nullptr);
        });
      }
    }
  });
  return y;
}

// (d^T x, d's column sums if bias) for float32 d [K, M] and x [K, N] on the panel products: a
// linear layer's weight (and bias) gradient (fused_rnn/ops/projection.py).
std::vector<c10::optional<at::Tensor>> weight_gradient(const at::Tensor& d_in, const at::Tensor& x_in, bool bias) {
  TORCH_CHECK_VALUE(panel_products_here(), "weight_gradient needs a CPU with AVX-512 (and the panel products on)");
  TORCH_CHECK_TYPE(d_in.scalar_type() == at::kFloat && x_in.scalar_type() == at::kFloat,
                   "weight_gradient takes float32, got ", d_in.scalar_type(), " and ", x_in.scalar_type());
  TORCH_CHECK_VALUE(d_in.dim() == 2 && x_in.dim() == 2 && d_in.device().is_cpu() && x_in.device().is_cpu() &&
                        d_in.size(0) == x_in.size(0),
                    "weight_gradient takes 2-d CPU tensors with as many rows, got ", d_in.sizes(), " and ", x_in.sizes());
  const at::Tensor d = d_in.contiguous(), x = x_in.contiguous();
  at::Tensor grad_w = at::zeros({d.size(1), x.size(1)}, d.options());
  at::Tensor grad_b = bias ? at::zeros({d.size(1)}, d.options()) : at::Tensor();
  add_weight_gradient(grad_w, d, x, bias ? &grad_b : nullptr);
  return {grad_w, bias ? c10::make_optional(grad_b) : c10::nullopt};
}

// Switches the product timing on or off; returns the ticks counted since the last call (and
// starts again from zero).
uint64_t time_products(bool on) {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  timing_products = on;
  return product_ticks.exchange(0);
#else
  return 0;
#endif
}

uint64_t ticks_now() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  return __rdtsc();
#else
  return 0;
#endif
}

size_t release_cached_buffers() { return buffer_cache().release(); }

size_t cached_buffer_bytes() { return buffer_cache().idle_bytes(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_rnn: the recurrences on the CPU (forward and the BPTT chain), every cell";
  m.def("use_panel_products", &use_panel_products,
        "switch the AVX-512 panel products on or off (where they apply); returns the previous setting",
        py::arg("on"));
  m.def("release_cached_buffers", &release_cached_buffers,
        "frees the idle buffers the extension keeps for its large per-call tensors; returns the bytes freed");
  m.def("cached_buffer_bytes", &cached_buffer_bytes, "bytes of idle buffers the extension keeps");
  m.def("panel_products_here", &panel_products_here, "whether the panel products run on this machine now");
  m.def("panel_matmul", &panel_matmul, "x W^T + b (transpose_w) or x W + b in float32 on the panel products",
        py::arg("x"), py::arg("w"), py::arg("b"), py::arg("transpose_w"));
  m.def("time_products", &time_products,
        "switch the panel products' tick count on or off (benchmarks); returns the ticks counted since "
        "the last call, all threads together", py::arg("on"));
  m.def("ticks_now", &ticks_now, "the time stamp counter now (to convert ticks to seconds)");
  m.def("weight_gradient", &weight_gradient,
        "(d^T x, d.sum(0) if bias else None) in float32 on the panel products (a weight and bias gradient)",
        py::arg("d"), py::arg("x"), py::arg("bias") = false);
  m.def("rnn_fwd", &rnn_fwd, "forward over all steps; returns the states h_1..h_T as [T, B, H]",
        py::arg("proj"), py::arg("ids"), py::arg("w_h"), py::arg("b_h"), py::arg("h0"), py::arg("cell") = "course",
        py::arg("w_in") = py::none(), py::arg("b_in") = py::none());
  m.def("rnn_bwd", &rnn_bwd,
        "backward through all steps (grad_h_n None: zeros); returns (grad_proj, grad_w_h, grad_b_h or None, "
        "grad_h0 or None (without h0), grad_w_in or None, grad_b_in or None)",
        py::arg("grad_out"), py::arg("grad_h_n"), py::arg("out"), py::arg("h0"), py::arg("proj"), py::arg("ids"),
        py::arg("w_h"), py::arg("has_bias"), py::arg("cell") = "course", py::arg("w_in") = py::none(),
        py::arg("b_in") = py::none());
  m.def("gated_fwd", &gated_fwd,
        "the LSTM's or GRU's forward over all steps (with w_ih: q is x [B, T, I], projected inside the loop); "
        "returns (out, cs, saved)",
        py::arg("q"), py::arg("w_hh"), py::arg("b_hh"), py::arg("h0"), py::arg("c0"), py::arg("w_hr"), py::arg("cell"),
        py::arg("keep_saved") = true, py::arg("w_ih") = py::none(), py::arg("b_ih") = py::none());
  m.def("gated_bwd", &gated_bwd,
        "the LSTM's or GRU's backward; returns (grad_q or, with w_ih, grad_x, grad_w_hh, grad_b_hh, grad_h0, "
        "grad_c0, grad_w_hr, grad_w_ih, grad_b_ih)",
        py::arg("grad_out"), py::arg("grad_cs"), py::arg("out"), py::arg("cs"), py::arg("saved"), py::arg("w_hh"),
        py::arg("has_hidden_bias"), py::arg("h0"), py::arg("c0"), py::arg("w_hr"), py::arg("cell"),
        py::arg("x") = py::none(), py::arg("w_ih") = py::none(), py::arg("has_input_bias") = false);
}
