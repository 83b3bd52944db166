// 3x3 VALID, stride-1 convolutions through oneDNN (NHWC activations, HWIO kernels) as XLA
// FFI handlers for the CPU: forward (with the bias added), input gradient, and kernel and
// bias gradients (in one pass), in float32, and in bfloat16 with float32 accumulation,
// float32 kernels and biases in and float32 kernel and bias gradients out.
// Built by setup.py, loaded and registered by deepdigits/ops/onednn_conv.py; XLA:CPU has no
// oneDNN convolution of its own, and oneDNN's direct convolutions need no im2col copies.
// Also bfloat16 matmuls with float32 accumulation (the dense layers in bfloat16,
// deepdigits/ops/onednn_dense.py), which oneDNN runs on AMX or AVX512-BF16.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A layer's shapes and its activations' data type (f32 or bf16); kernels and kernel
// gradients are f32 in memory either way.
// XLA:CPU runs independent thunks at once (a layer's input and kernel gradients), but each
// oneDNN call already spreads over every core with its own OpenMP team: two at once would
// fight for the cores, so the calls take turns.
std::mutex& ExecutionMutex() {
  static std::mutex mu;
  return mu;
}

struct Shapes {
  int64_t n, h, w, c, o;
  dt act = dt::f32;
  bool operator<(const Shapes& b) const {
    return std::tie(n, h, w, c, o, act) < std::tie(b.n, b.h, b.w, b.c, b.o, b.act);
  }
  memory::desc src() const { return memory::desc({n, c, h, w}, act, tag::nhwc); }
  memory::desc dst() const { return memory::desc({n, o, h - 2, w - 2}, act, tag::nhwc); }
  memory::desc wei(tag t, dt type) const { return memory::desc({o, c, 3, 3}, type, t); }
  memory::desc bias() const { return memory::desc({o}, dt::f32, tag::a); }
};

// The three primitives for one layer's shapes; created once (creation JIT-compiles them).
struct Prims {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::convolution_backward_weights bwd_weights;
};

Prims& GetPrims(const Shapes& s) {
  static std::mutex mu;
  static std::map<Shapes, std::unique_ptr<Prims>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(s);
  if (it != cache.end()) return *it->second;
  auto& eng = Engine();
  memory::dims strides = {1, 1}, pad = {0, 0};
  auto p = std::make_unique<Prims>();
  p->fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      s.src(), s.wei(tag::any, s.act), s.bias(), s.dst(), strides, pad, pad);
  p->fwd = dnnl::convolution_forward(p->fwd_pd);
  p->bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, s.src(), s.wei(tag::any, s.act), s.dst(),
      strides, pad, pad, p->fwd_pd);
  p->bwd_data = dnnl::convolution_backward_data(p->bwd_data_pd);
  // Kernel and bias gradients accumulate and stay in f32, whatever the activations' type.
  p->bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, s.src(), s.wei(tag::any, dt::f32), s.bias(),
      s.dst(), strides, pad, pad, p->fwd_pd);
  p->bwd_weights = dnnl::convolution_backward_weights(p->bwd_weights_pd);
  auto& ref = *p;
  cache[s] = std::move(p);
  return ref;
}

// An f32 kernel in HWIO, reordered into the layout and type the primitive asks for (or
// used as is).
memory KernelIn(const Shapes& s, float* hwio, const memory::desc& desc, dnnl::stream& st) {
  memory user(s.wei(tag::hwio, dt::f32), Engine(), hwio);
  if (desc == user.get_desc()) return user;
  memory wanted(desc, Engine());
  dnnl::reorder(user, wanted).execute(st, user, wanted);
  return wanted;
}

template <ffi::DataType T>
constexpr dt Act() { return T == ffi::DataType::BF16 ? dt::bf16 : dt::f32; }

template <ffi::DataType T>
ffi::Error Forward(ffi::Buffer<T> x, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> b,
                   ffi::ResultBuffer<T> y) {
  try {
    auto d = x.dimensions(); auto kd = k.dimensions();
    Shapes s{d[0], d[1], d[2], d[3], kd[3], Act<T>()};
    auto& p = GetPrims(s);
    std::lock_guard<std::mutex> one_at_a_time(ExecutionMutex());
    dnnl::stream st(Engine());
    memory src(s.src(), Engine(), x.untyped_data());
    memory dst(s.dst(), Engine(), y->untyped_data());
    memory wei = KernelIn(s, k.typed_data(), p.fwd_pd.weights_desc(), st);
    memory bias(s.bias(), Engine(), b.typed_data());
    p.fwd.execute(st, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_BIAS, bias},
                       {DNNL_ARG_DST, dst}});
    st.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

template <ffi::DataType T>
ffi::Error InputGrad(ffi::Buffer<T> dy, ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<T> dx) {
  try {
    auto d = dx->dimensions(); auto kd = k.dimensions();
    Shapes s{d[0], d[1], d[2], d[3], kd[3], Act<T>()};
    auto& p = GetPrims(s);
    std::lock_guard<std::mutex> one_at_a_time(ExecutionMutex());
    dnnl::stream st(Engine());
    memory diff_dst(s.dst(), Engine(), dy.untyped_data());
    memory diff_src(s.src(), Engine(), dx->untyped_data());
    memory wei = KernelIn(s, k.typed_data(), p.bwd_data_pd.weights_desc(), st);
    p.bwd_data.execute(st, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, wei},
                            {DNNL_ARG_DIFF_SRC, diff_src}});
    st.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

template <ffi::DataType T>
ffi::Error KernelGrad(ffi::Buffer<T> x, ffi::Buffer<T> dy, ffi::ResultBuffer<ffi::F32> dk,
                      ffi::ResultBuffer<ffi::F32> db) {
  try {
    auto d = x.dimensions(); auto kd = dk->dimensions();
    Shapes s{d[0], d[1], d[2], d[3], kd[3], Act<T>()};
    auto& p = GetPrims(s);
    std::lock_guard<std::mutex> one_at_a_time(ExecutionMutex());
    dnnl::stream st(Engine());
    memory src(s.src(), Engine(), x.untyped_data());
    memory diff_dst(s.dst(), Engine(), dy.untyped_data());
    memory user(s.wei(tag::hwio, dt::f32), Engine(), dk->typed_data());
    memory diff_bias(s.bias(), Engine(), db->typed_data());
    auto desc = p.bwd_weights_pd.diff_weights_desc();
    bool direct = desc == user.get_desc();
    memory diff_weights = direct ? user : memory(desc, Engine());
    p.bwd_weights.execute(st, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                               {DNNL_ARG_DIFF_WEIGHTS, diff_weights},
                               {DNNL_ARG_DIFF_BIAS, diff_bias}});
    if (!direct) dnnl::reorder(diff_weights, user).execute(st, diff_weights, user);
    st.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

// A bf16 matmul's shapes: out[m, n] = a[m, k] @ b[k, n], either operand stored transposed
// (a as [k, m], b as [n, k]), out in f32 or bf16.
struct MatmulShapes {
  int64_t m, k, n;
  bool ta, tb;
  dt out;
  bool operator<(const MatmulShapes& o) const {
    return std::tie(m, k, n, ta, tb, out) < std::tie(o.m, o.k, o.n, o.ta, o.tb, o.out);
  }
  memory::desc a() const { return memory::desc({m, k}, dt::bf16, ta ? tag::ba : tag::ab); }
  memory::desc b() const { return memory::desc({k, n}, dt::bf16, tb ? tag::ba : tag::ab); }
  memory::desc c() const { return memory::desc({m, n}, out, tag::ab); }
};

dnnl::matmul& GetMatmul(const MatmulShapes& s) {
  static std::mutex mu;
  static std::map<MatmulShapes, std::unique_ptr<dnnl::matmul>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(s);
  if (it != cache.end()) return *it->second;
  dnnl::matmul::primitive_desc pd(Engine(), s.a(), s.b(), s.c());
  auto& ref = *(cache[s] = std::make_unique<dnnl::matmul>(pd));
  return ref;
}

template <ffi::DataType Out>
ffi::Error Matmul(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                  ffi::ResultBuffer<Out> c, bool transpose_a, bool transpose_b) {
  try {
    auto ad = a.dimensions(); auto cd = c->dimensions();
    MatmulShapes s{cd[0], transpose_a ? ad[0] : ad[1], cd[1], transpose_a, transpose_b,
                   Out == ffi::DataType::BF16 ? dt::bf16 : dt::f32};
    auto& prim = GetMatmul(s);
    std::lock_guard<std::mutex> one_at_a_time(ExecutionMutex());
    dnnl::stream st(Engine());
    memory src(s.a(), Engine(), a.untyped_data());
    memory wei(s.b(), Engine(), b.untyped_data());
    memory dst(s.c(), Engine(), c->untyped_data());
    prim.execute(st, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
    st.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

#define DEEPDIGITS_HANDLERS(SUFFIX, T)                                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepdigitsConvForward##SUFFIX, Forward<T>,                  \
                                ffi::Ffi::Bind().Arg<ffi::Buffer<T>>()                      \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<T>>());   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepdigitsConvInputGrad##SUFFIX, InputGrad<T>,              \
                                ffi::Ffi::Bind().Arg<ffi::Buffer<T>>()                      \
                                    .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<T>>());   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepdigitsConvKernelGrad##SUFFIX, KernelGrad<T>,            \
                                ffi::Ffi::Bind().Arg<ffi::Buffer<T>>()                      \
                                    .Arg<ffi::Buffer<T>>().Ret<ffi::Buffer<ffi::F32>>()     \
                                    .Ret<ffi::Buffer<ffi::F32>>());

DEEPDIGITS_HANDLERS(F32, ffi::DataType::F32)
DEEPDIGITS_HANDLERS(BF16, ffi::DataType::BF16)

#define DEEPDIGITS_MATMUL_HANDLER(SUFFIX, OUT)                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepdigitsMatmulBF16To##SUFFIX, Matmul<OUT>,                \
                                ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::BF16>>()              \
                                    .Arg<ffi::Buffer<ffi::BF16>>().Ret<ffi::Buffer<OUT>>()  \
                                    .Attr<bool>("transpose_a").Attr<bool>("transpose_b"));

DEEPDIGITS_MATMUL_HANDLER(F32, ffi::DataType::F32)
DEEPDIGITS_MATMUL_HANDLER(BF16, ffi::DataType::BF16)

// Which oneDNN implementation runs a bf16 matmul of these shapes (out f32), e.g.
// "brg_matmul:avx512_core_amx", for the benchmark's report.
extern "C" const char* DeepdigitsMatmulImpl(int m, int k, int n) {
  static std::string out;
  try {
    MatmulShapes s{m, k, n, false, false, dt::f32};
    out = dnnl::matmul::primitive_desc(Engine(), s.a(), s.b(), s.c()).impl_info_str();
  } catch (const dnnl::error& e) {
    out = std::string("unsupported: ") + e.what();
  }
  return out.c_str();
}

// Which oneDNN implementations run for these shapes and activation type (bf16: true for
// bfloat16), for the benchmark's report and the bf16 check; "unsupported: ..." where
// oneDNN has no implementation for them on this CPU.
extern "C" const char* DeepdigitsConvImpls(int n, int h, int w, int c, int o, bool bf16) {
  static std::string out;
  try {
    auto& p = GetPrims(Shapes{n, h, w, c, o, bf16 ? dt::bf16 : dt::f32});
    out = std::string("fwd ") + p.fwd_pd.impl_info_str() + ", bwd_data " +
          p.bwd_data_pd.impl_info_str() + ", bwd_weights " + p.bwd_weights_pd.impl_info_str();
  } catch (const dnnl::error& e) {
    out = std::string("unsupported: ") + e.what();
  }
  return out.c_str();
}
