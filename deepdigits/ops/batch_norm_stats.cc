// The per-feature sums of ReLU-then-BatchNorm in training (deepdigits/ops/batch_norm.py)
// as XLA FFI handlers for the CPU, each one pass over the activations:
//   ReluStats:     the sums of relu(x) and of relu(x)^2 (the forward's mean and variance);
//   ReluGradStats: the sums of g and of g * (relu(x) - mean) (the backward's).
// x and g are [groups, ..., features], float32 or bfloat16; the sums are float32, per
// group and feature. XLA:CPU writes ReLU(x) in float32 (and in the backward, g in float32
// and the normalised input) to memory before each of its reductions and reads it back;
// here the activations are read once, in their own type.
//
// Summation order: each group's rows are cut into one chunk per thread of XLA's intra-op
// pool (thread_chunks.h), a chunk sums blocks of kBlockRows rows, the blocks' sums are added
// to the chunk's, and the chunks' sums are added in chunk order: the result does not
// depend on which thread ran which chunk, and float32's rounding error grows with the
// block and chunk counts, not with the row count.
#include <algorithm>
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

inline float Load(const float* p, int64_t i) { return p[i]; }

inline float Load(const uint16_t* p, int64_t i) {  // bfloat16: the high half of a float32
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// max(v, 0) as jnp.maximum computes it: NaN stays NaN, so that a non-finite activation
// makes its sums non-finite.
inline float Relu(float v) { return v < 0.0f ? 0.0f : v; }

// The shape of a [groups, ..., features] array as [groups, rows, features].
struct Layout {
  int64_t groups, rows, features;
  template <typename Dims>
  explicit Layout(const Dims& d) : groups(d[0]), rows(1), features(d[d.size() - 1]) {
    for (size_t i = 1; i + 1 < d.size(); ++i) rows *= d[i];
  }
};

// One row's terms: relu(x) and relu(x)^2 without g; g and g * (relu(x) - mean) with it.
template <typename T>
inline void AddRow(const T* __restrict x, float* __restrict a, float* __restrict b,
                   int64_t features) {
  for (int64_t f = 0; f < features; ++f) {
    const float v = Relu(Load(x, f));
    a[f] += v;
    b[f] += v * v;
  }
}

template <typename T>
inline void AddRow(const T* __restrict x, const T* __restrict g, const float* __restrict mean,
                   float* __restrict a, float* __restrict b, int64_t features) {
  for (int64_t f = 0; f < features; ++f) {
    const float d = Load(g, f);
    a[f] += d;
    b[f] += d * (Relu(Load(x, f)) - mean[f]);
  }
}

// Adds the sums over rows [begin, end) of one group (x, g: that group's rows; g null in
// the forward) to sum_a and sum_b.
template <typename T>
void SumRows(const T* x, const T* g, const float* mean, int64_t begin, int64_t end,
             int64_t features, float* sum_a, float* sum_b) {
  std::vector<float> block_a(features), block_b(features);
  for (int64_t start = begin; start < end; start += kBlockRows) {
    std::fill(block_a.begin(), block_a.end(), 0.0f);
    std::fill(block_b.begin(), block_b.end(), 0.0f);
    const int64_t stop = std::min(end, start + kBlockRows);
    for (int64_t row = start; row < stop; ++row) {
      if (g == nullptr) {
        AddRow(x + row * features, block_a.data(), block_b.data(), features);
      } else {
        AddRow(x + row * features, g + row * features, mean, block_a.data(), block_b.data(),
               features);
      }
    }
    for (int64_t f = 0; f < features; ++f) {
      sum_a[f] += block_a[f];
      sum_b[f] += block_b[f];
    }
  }
}

// The sums of every group and feature into out_a, out_b ([groups, features]).
template <typename T>
ffi::Error Sums(ffi::ThreadPool& pool, const Layout& s, const T* x, const T* g,
                const float* mean, float* out_a, float* out_b) {
  try {
    const auto ranges = deepdigits::Split(s.rows, deepdigits::Threads(pool));
    const int64_t parts = ranges.size();
    // Each (group, chunk)'s two sums, [groups, parts, 2, features].
    std::vector<float> partial(s.groups * parts * 2 * s.features, 0.0f);
    auto error = deepdigits::RunChunks(pool, s.groups * parts, [&](int item) {
      const int64_t group = item / parts;
      const auto& r = ranges[item % parts];
      const int64_t offset = group * s.rows * s.features;
      float* sums = partial.data() + item * 2 * s.features;
      SumRows(x + offset, g == nullptr ? nullptr : g + offset,
              mean == nullptr ? nullptr : mean + group * s.features, r.start,
              r.start + r.size, s.features, sums, sums + s.features);
    });
    if (!error.empty()) return ffi::Error(ffi::ErrorCode::kInternal, error);
    for (int64_t group = 0; group < s.groups; ++group) {
      float* a = out_a + group * s.features;
      float* b = out_b + group * s.features;
      std::fill(a, a + s.features, 0.0f);
      std::fill(b, b + s.features, 0.0f);
      for (int64_t p = 0; p < parts; ++p) {
        const float* sums = partial.data() + (group * parts + p) * 2 * s.features;
        for (int64_t f = 0; f < s.features; ++f) {
          a[f] += sums[f];
          b[f] += sums[s.features + f];
        }
      }
    }
  } catch (const std::exception& e) {  // memory running out
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, e.what());
  }
  return ffi::Error::Success();
}

template <ffi::DataType T>
ffi::Error ReluStats(ffi::ThreadPool pool, ffi::Buffer<T> x, ffi::ResultBuffer<ffi::F32> sum,
                     ffi::ResultBuffer<ffi::F32> sum_of_squares) {
  return Sums(pool, Layout(x.dimensions()), x.typed_data(), decltype(x.typed_data())(nullptr),
              nullptr, sum->typed_data(), sum_of_squares->typed_data());
}

template <ffi::DataType T>
ffi::Error ReluGradStats(ffi::ThreadPool pool, ffi::Buffer<T> x, ffi::Buffer<T> g,
                         ffi::Buffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> g_sum,
                         ffi::ResultBuffer<ffi::F32> g_centred_sum) {
  return Sums(pool, Layout(x.dimensions()), x.typed_data(), g.typed_data(), mean.typed_data(),
              g_sum->typed_data(), g_centred_sum->typed_data());
}

}  // namespace

#define DEEPDIGITS_STATS_HANDLERS(SUFFIX, T)                                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepdigitsReluStats##SUFFIX, ReluStats<T>,                  \
                                ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()                     \
                                    .Arg<ffi::Buffer<T>>()                                  \
                                    .Ret<ffi::Buffer<ffi::F32>>()                           \
                                    .Ret<ffi::Buffer<ffi::F32>>());                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepdigitsReluGradStats##SUFFIX, ReluGradStats<T>,          \
                                ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()                     \
                                    .Arg<ffi::Buffer<T>>()                                  \
                                    .Arg<ffi::Buffer<T>>()                                  \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Ret<ffi::Buffer<ffi::F32>>()                           \
                                    .Ret<ffi::Buffer<ffi::F32>>());

DEEPDIGITS_STATS_HANDLERS(F32, ffi::DataType::F32)
DEEPDIGITS_STATS_HANDLERS(BF16, ffi::DataType::BF16)
