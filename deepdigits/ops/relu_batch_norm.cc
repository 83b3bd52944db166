// ReLU then BatchNorm in training (deepdigits/ops/batch_norm.py), forward and backward, as
// XLA FFI handlers for the CPU. x and the output gradient g are [groups, ..., features],
// float32 or bfloat16; statistics are float32, per group and feature.
//   Forward:  the sums of ReLU(x) and ReLU(x)^2, then y = (ReLU(x) - mean) * rstd * scale
//             + bias, with mean, variance as Flax computes them (E[x^2] - E[x]^2, clipped
//             at 0) and rstd = 1 / sqrt(variance + epsilon).
//   Backward: the sums of g and g * (ReLU(x) - mean), then the input gradient where x > 0,
//             and the scale's and bias's gradients (summed over the groups).
// Each is two passes over the activations in their own type. XLA:CPU wrote ReLU(x) in
// float32 (and in the backward g and the normalised input) to memory before each of its
// reductions and read it back, and ran its element-wise passes on one thread at a time.
//
// Each group's rows are cut into one chunk per thread of XLA's intra-op pool
// (thread_chunks.h). A chunk sums blocks of kBlockRows rows, and the chunks' sums are added
// in chunk order: the results do not depend on which thread ran which chunk, and float32's
// rounding error grows with the block and chunk counts, not with the row count.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "thread_chunks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockRows = 64;

#define DEEPDIGITS_INLINE inline __attribute__((always_inline))

DEEPDIGITS_INLINE float Load(const float* p, int64_t i) { return p[i]; }

DEEPDIGITS_INLINE float Load(const uint16_t* p, int64_t i) {  // bfloat16: the high half of a float32
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

DEEPDIGITS_INLINE void Store(float* p, int64_t i, float value) { p[i] = value; }

DEEPDIGITS_INLINE void Store(uint16_t* p, int64_t i, float value) {  // rounded to nearest even
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  p[i] = static_cast<uint16_t>(nan ? (bits >> 16) | 0x40u : rounded);
}

// max(v, 0) as jnp.maximum computes it: NaN stays NaN (std::max(0.0f, v) would drop it).
DEEPDIGITS_INLINE float Relu(float v) { return v < 0.0f ? 0.0f : v; }

// The shape of a [groups, ..., features] array as [groups, rows, features].
struct Layout {
  int64_t groups, rows, features;
  template <typename Dims>
  explicit Layout(const Dims& d) : groups(d[0]), rows(1), features(d[d.size() - 1]) {
    for (size_t i = 1; i + 1 < d.size(); ++i) rows *= d[i];
  }
};

// Runs body(group, first row, end row) over every group's chunks of rows, on this thread
// and XLA's; the chunk index item = group * parts + part.
template <typename Body>
std::string ForChunks(ffi::ThreadPool& pool, const Layout& s,
                      const std::vector<deepdigits::Range>& ranges, Body body) {
  const int64_t parts = ranges.size();
  return deepdigits::RunChunks(pool, s.groups * parts, [&](int item) {
    const auto& r = ranges[item % parts];
    body(item / parts, item, r.start, r.start + r.size);
  });
}

// One row's terms: ReLU(x) and ReLU(x)^2 (forward); g and g * (ReLU(x) - mean) (backward).
template <typename T>
DEEPDIGITS_INLINE void AddRow(const T* __restrict x, float* __restrict a, float* __restrict b,
                   int64_t features) {
  for (int64_t f = 0; f < features; ++f) {
    const float v = Relu(Load(x, f));
    a[f] += v;
    b[f] += v * v;
  }
}

template <typename T>
DEEPDIGITS_INLINE void AddRow(const T* __restrict x, const T* __restrict g, const float* __restrict mean,
                   float* __restrict a, float* __restrict b, int64_t features) {
  for (int64_t f = 0; f < features; ++f) {
    const float d = Load(g, f);
    a[f] += d;
    b[f] += d * (Relu(Load(x, f)) - mean[f]);
  }
}

// Adds the sums over rows [begin, end) of one group (x, g: the group's first row; g null in
// the forward) to total_a and total_b, a block of kBlockRows rows at a time.
template <typename T>
DEEPDIGITS_INLINE void SumRange(const T* x, const T* g, const float* mean, int64_t begin,
                                int64_t end, int64_t n, float* total_a, float* total_b) {
  std::vector<float> block_a(n), block_b(n);
  for (int64_t start = begin; start < end; start += kBlockRows) {
    std::fill(block_a.begin(), block_a.end(), 0.0f);
    std::fill(block_b.begin(), block_b.end(), 0.0f);
    for (int64_t row = start; row < std::min(end, start + kBlockRows); ++row) {
      if (g == nullptr) {
        AddRow(x + row * n, block_a.data(), block_b.data(), n);
      } else {
        AddRow(x + row * n, g + row * n, mean, block_a.data(), block_b.data(), n);
      }
    }
    for (int64_t f = 0; f < n; ++f) {
      total_a[f] += block_a[f];
      total_b[f] += block_b[f];
    }
  }
}

// y = (ReLU(x) - mean) * factor + bias over rows [begin, end) of one group.
template <typename T>
DEEPDIGITS_INLINE void NormaliseRange(const T* x, T* y, const float* __restrict mean,
                                      const float* __restrict factor,
                                      const float* __restrict bias, int64_t begin,
                                      int64_t end, int64_t n) {
  for (int64_t row = begin; row < end; ++row) {
    const T* __restrict xr = x + row * n;
    T* __restrict yr = y + row * n;
    for (int64_t f = 0; f < n; ++f) {
      Store(yr, f, (Relu(Load(xr, f)) - mean[f]) * factor[f] + bias[f]);
    }
  }
}

// The input gradient over rows [begin, end) of one group: where x > 0,
// factor * (g - g_mean - x_hat * g_x_hat_mean), x_hat = (ReLU(x) - mean) * rstd; else 0.
template <typename T>
DEEPDIGITS_INLINE void GradRange(const T* x, const T* g, T* g_x, const float* __restrict mean,
                                 const float* __restrict rstd, const float* __restrict factor,
                                 const float* __restrict g_mean,
                                 const float* __restrict g_x_hat_mean, int64_t begin,
                                 int64_t end, int64_t n) {
  for (int64_t row = begin; row < end; ++row) {
    const T* __restrict xr = x + row * n;
    const T* __restrict gr = g + row * n;
    T* __restrict out = g_x + row * n;
    for (int64_t f = 0; f < n; ++f) {
      const float v = Load(xr, f);
      const float x_hat = (Relu(v) - mean[f]) * rstd[f];
      const float value = factor[f] * (Load(gr, f) - g_mean[f] - x_hat * g_x_hat_mean[f]);
      Store(out, f, v > 0.0f ? value : 0.0f);
    }
  }
}

// Each of the three loops above compiled for AVX-512, for AVX2 and for the baseline, and
// run as the host allows (`NAME##OnHost`): they are bound by memory only with wide
// vectors. Built with -ffp-contract=off, all three round alike.
#if defined(__x86_64__)
enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa HostIsa() {
  static const Isa isa = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
                             ? Isa::kAvx512
                             : __builtin_cpu_supports("avx2") ? Isa::kAvx2 : Isa::kBaseline;
  return isa;
}

#define DEEPDIGITS_ON_HOST(NAME)                                                         \
  template <typename... Args>                                                            \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2"))) void NAME##Avx512(  \
      Args... args) {                                                                    \
    NAME(args...);                                                                       \
  }                                                                                      \
  template <typename... Args>                                                            \
  __attribute__((target("avx2"))) void NAME##Avx2(Args... args) {                        \
    NAME(args...);                                                                       \
  }                                                                                      \
  template <typename... Args>                                                            \
  void NAME##OnHost(Args... args) {                                                      \
    switch (HostIsa()) {                                                                 \
      case Isa::kAvx512: return NAME##Avx512(args...);                                   \
      case Isa::kAvx2: return NAME##Avx2(args...);                                       \
      default: return NAME(args...);                                                     \
    }                                                                                    \
  }
#else  // other processors: the loops as the compiler builds them for the target
#define DEEPDIGITS_ON_HOST(NAME)                                                         \
  template <typename... Args>                                                            \
  void NAME##OnHost(Args... args) {                                                      \
    NAME(args...);                                                                       \
  }
#endif

DEEPDIGITS_ON_HOST(SumRange)
DEEPDIGITS_ON_HOST(NormaliseRange)
DEEPDIGITS_ON_HOST(GradRange)

// The two sums of each group and feature ([groups, features] each): of ReLU(x) and its
// square where g is null, else of g and g * (ReLU(x) - mean). Returns an error or "".
template <typename T>
std::string Sums(ffi::ThreadPool& pool, const Layout& s,
                 const std::vector<deepdigits::Range>& ranges, const T* x, const T* g,
                 const float* mean, std::vector<float>& sum_a, std::vector<float>& sum_b) {
  const int64_t parts = ranges.size(), n = s.features;
  std::vector<float> partial(s.groups * parts * 2 * n, 0.0f);  // [groups, parts, 2, n]
  auto error = ForChunks(pool, s, ranges, [&](int64_t group, int64_t item, int64_t begin,
                                              int64_t end) {
    float* total = partial.data() + item * 2 * n;
    const int64_t offset = group * s.rows * n;
    SumRangeOnHost(x + offset, g == nullptr ? g : g + offset,
                   mean == nullptr ? mean : mean + group * n, begin, end, n, total, total + n);
  });
  sum_a.assign(s.groups * n, 0.0f);
  sum_b.assign(s.groups * n, 0.0f);
  for (int64_t group = 0; group < s.groups; ++group) {
    for (int64_t p = 0; p < parts; ++p) {
      const float* sums = partial.data() + (group * parts + p) * 2 * n;
      for (int64_t f = 0; f < n; ++f) {
        sum_a[group * n + f] += sums[f];
        sum_b[group * n + f] += sums[n + f];
      }
    }
  }
  return error;
}

inline float Rstd(float var, float epsilon) { return 1.0f / std::sqrt(var + epsilon); }

ffi::Error Failed(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInternal, "ReLU-BatchNorm: " + what);
}

template <ffi::DataType D>
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<D> x_buffer, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<D> y_buffer,
                   ffi::ResultBuffer<ffi::F32> mean_out, ffi::ResultBuffer<ffi::F32> var_out,
                   float epsilon) {
  try {
    const Layout s(x_buffer.dimensions());
    const int64_t n = s.features;
    const auto* x = x_buffer.typed_data();
    auto* y = y_buffer->typed_data();
    const auto ranges = deepdigits::Split(s.rows, deepdigits::Threads(pool));
    std::vector<float> sum, sum_of_squares;
    auto error = Sums(pool, s, ranges, x, decltype(x)(nullptr), nullptr, sum, sum_of_squares);
    if (!error.empty()) return Failed(error);
    // Per group and feature: the mean, the variance, and rstd * scale.
    float* mean = mean_out->typed_data();
    float* var = var_out->typed_data();
    std::vector<float> factor(s.groups * n);
    const float count = static_cast<float>(s.rows);
    for (int64_t i = 0; i < s.groups * n; ++i) {
      mean[i] = sum[i] / count;
      var[i] = Relu(sum_of_squares[i] / count - mean[i] * mean[i]);  // NaN stays NaN
      factor[i] = Rstd(var[i], epsilon) * scale.typed_data()[i % n];
    }
    const float* b = bias.typed_data();
    error = ForChunks(pool, s, ranges, [&](int64_t group, int64_t, int64_t begin,
                                           int64_t end) {
      const int64_t offset = group * s.rows * n;
      NormaliseRangeOnHost(x + offset, y + offset, mean + group * n,
                           factor.data() + group * n, b, begin, end, n);
    });
    if (!error.empty()) return Failed(error);
  } catch (const std::exception& e) {  // memory running out
    return Failed(e.what());
  }
  return ffi::Error::Success();
}

template <ffi::DataType D>
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<D> x_buffer, ffi::Buffer<D> g_buffer,
                    ffi::Buffer<ffi::F32> mean_in, ffi::Buffer<ffi::F32> var_in,
                    ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<D> g_x_buffer,
                    ffi::ResultBuffer<ffi::F32> g_scale, ffi::ResultBuffer<ffi::F32> g_bias,
                    float epsilon) {
  try {
    const Layout s(x_buffer.dimensions());
    const int64_t n = s.features;
    const auto* x = x_buffer.typed_data();
    const auto* g = g_buffer.typed_data();
    auto* g_x = g_x_buffer->typed_data();
    const float* mean = mean_in.typed_data();
    const float* var = var_in.typed_data();
    const auto ranges = deepdigits::Split(s.rows, deepdigits::Threads(pool));
    std::vector<float> g_sum, g_centred_sum;
    auto error = Sums(pool, s, ranges, x, g, mean, g_sum, g_centred_sum);
    if (!error.empty()) return Failed(error);
    // Per group and feature: rstd, rstd * scale, the mean of g, and the mean of g times the
    // normalised input (0 where the variance was clipped at 0: it passes no gradient).
    const float count = static_cast<float>(s.rows);
    std::vector<float> rstd(s.groups * n), factor(s.groups * n), g_mean(s.groups * n),
        g_x_hat_mean(s.groups * n);
    float* scale_grad = g_scale->typed_data();
    float* bias_grad = g_bias->typed_data();
    std::fill(scale_grad, scale_grad + n, 0.0f);
    std::fill(bias_grad, bias_grad + n, 0.0f);
    for (int64_t i = 0; i < s.groups * n; ++i) {
      rstd[i] = Rstd(var[i], epsilon);
      factor[i] = rstd[i] * scale.typed_data()[i % n];
      g_mean[i] = g_sum[i] / count;
      const float g_x_hat_sum = g_centred_sum[i] * rstd[i];
      g_x_hat_mean[i] = var[i] > 0.0f ? g_x_hat_sum / count : 0.0f;
      scale_grad[i % n] += g_x_hat_sum;  // groups in order
      bias_grad[i % n] += g_sum[i];
    }
    error = ForChunks(pool, s, ranges, [&](int64_t group, int64_t, int64_t begin,
                                           int64_t end) {
      const int64_t offset = group * s.rows * n, at = group * n;
      GradRangeOnHost(x + offset, g + offset, g_x + offset, mean + at, rstd.data() + at,
                      factor.data() + at, g_mean.data() + at, g_x_hat_mean.data() + at, begin,
                      end, n);
    });
    if (!error.empty()) return Failed(error);
  } catch (const std::exception& e) {  // memory running out
    return Failed(e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

#define DEEPDIGITS_RELU_BATCH_NORM_HANDLERS(SUFFIX, D)                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepdigitsReluBatchNormForward##SUFFIX, Forward<D>,         \
                                ffi::Ffi::Bind()                                            \
                                    .Ctx<ffi::ThreadPool>()                                 \
                                    .Arg<ffi::Buffer<D>>()                                  \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Ret<ffi::Buffer<D>>()                                  \
                                    .Ret<ffi::Buffer<ffi::F32>>()                           \
                                    .Ret<ffi::Buffer<ffi::F32>>()                           \
                                    .Attr<float>("epsilon"));                               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepdigitsReluBatchNormBackward##SUFFIX, Backward<D>,       \
                                ffi::Ffi::Bind()                                            \
                                    .Ctx<ffi::ThreadPool>()                                 \
                                    .Arg<ffi::Buffer<D>>()                                  \
                                    .Arg<ffi::Buffer<D>>()                                  \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Ret<ffi::Buffer<D>>()                                  \
                                    .Ret<ffi::Buffer<ffi::F32>>()                           \
                                    .Ret<ffi::Buffer<ffi::F32>>()                           \
                                    .Attr<float>("epsilon"));

DEEPDIGITS_RELU_BATCH_NORM_HANDLERS(F32, ffi::DataType::F32)
DEEPDIGITS_RELU_BATCH_NORM_HANDLERS(BF16, ffi::DataType::BF16)
