// 3x3 VALID, stride-1 convolutions through oneDNN (NHWC activations, HWIO kernels, float32)
// as XLA FFI handlers for the CPU: forward, input gradient and kernel gradient. Built by
// setup.py, loaded and registered by deepdigits/onednn_conv.py; XLA:CPU has no oneDNN
// convolution of its own, and oneDNN's direct convolutions need no im2col copies.
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

struct Shapes {
  int64_t n, h, w, c, o;
  bool operator<(const Shapes& b) const {
    return std::tie(n, h, w, c, o) < std::tie(b.n, b.h, b.w, b.c, b.o);
  }
  memory::desc src(tag t = tag::nhwc) const { return memory::desc({n, c, h, w}, dt::f32, t); }
  memory::desc dst(tag t = tag::nhwc) const { return memory::desc({n, o, h - 2, w - 2}, dt::f32, t); }
  memory::desc wei(tag t) const { return memory::desc({o, c, 3, 3}, dt::f32, t); }
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
      s.src(), s.wei(tag::any), s.dst(), strides, pad, pad);
  p->fwd = dnnl::convolution_forward(p->fwd_pd);
  p->bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, s.src(), s.wei(tag::any), s.dst(), strides,
      pad, pad, p->fwd_pd);
  p->bwd_data = dnnl::convolution_backward_data(p->bwd_data_pd);
  p->bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, s.src(), s.wei(tag::any), s.dst(), strides,
      pad, pad, p->fwd_pd);
  p->bwd_weights = dnnl::convolution_backward_weights(p->bwd_weights_pd);
  auto& ref = *p;
  cache[s] = std::move(p);
  return ref;
}

// A kernel in HWIO, reordered into the layout the primitive asks for (or used as is).
memory KernelIn(const Shapes& s, float* hwio, const memory::desc& desc, dnnl::stream& st) {
  memory user(s.wei(tag::hwio), Engine(), hwio);
  if (desc == user.get_desc()) return user;
  memory wanted(desc, Engine());
  dnnl::reorder(user, wanted).execute(st, user, wanted);
  return wanted;
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y) {
  try {
    auto d = x.dimensions(); auto kd = k.dimensions();
    Shapes s{d[0], d[1], d[2], d[3], kd[3]};
    auto& p = GetPrims(s);
    dnnl::stream st(Engine());
    memory src(s.src(), Engine(), x.typed_data());
    memory dst(s.dst(), Engine(), y->typed_data());
    memory wei = KernelIn(s, k.typed_data(), p.fwd_pd.weights_desc(), st);
    p.fwd.execute(st, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
    st.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error InputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k,
                     ffi::ResultBuffer<ffi::F32> dx) {
  try {
    auto d = dx->dimensions(); auto kd = k.dimensions();
    Shapes s{d[0], d[1], d[2], d[3], kd[3]};
    auto& p = GetPrims(s);
    dnnl::stream st(Engine());
    memory diff_dst(s.dst(), Engine(), dy.typed_data());
    memory diff_src(s.src(), Engine(), dx->typed_data());
    memory wei = KernelIn(s, k.typed_data(), p.bwd_data_pd.weights_desc(), st);
    p.bwd_data.execute(st, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, wei},
                            {DNNL_ARG_DIFF_SRC, diff_src}});
    st.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error KernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dk) {
  try {
    auto d = x.dimensions(); auto kd = dk->dimensions();
    Shapes s{d[0], d[1], d[2], d[3], kd[3]};
    auto& p = GetPrims(s);
    dnnl::stream st(Engine());
    memory src(s.src(), Engine(), x.typed_data());
    memory diff_dst(s.dst(), Engine(), dy.typed_data());
    memory user(s.wei(tag::hwio), Engine(), dk->typed_data());
    auto desc = p.bwd_weights_pd.diff_weights_desc();
    if (desc == user.get_desc()) {
      p.bwd_weights.execute(st, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                                 {DNNL_ARG_DIFF_WEIGHTS, user}});
    } else {
      memory tmp(desc, Engine());
      p.bwd_weights.execute(st, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                                 {DNNL_ARG_DIFF_WEIGHTS, tmp}});
      dnnl::reorder(tmp, user).execute(st, tmp, user);
    }
    st.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepdigitsConvForward, Forward,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepdigitsConvInputGrad, InputGrad,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepdigitsConvKernelGrad, KernelGrad,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());

// Which oneDNN implementations run for these shapes (for the benchmark's report).
extern "C" const char* DeepdigitsConvImpls(int n, int h, int w, int c, int o) {
  static std::string out;
  auto& p = GetPrims(Shapes{n, h, w, c, o});
  out = std::string("fwd ") + p.fwd_pd.impl_info_str() + ", bwd_data " +
        p.bwd_data_pd.impl_info_str() + ", bwd_weights " + p.bwd_weights_pd.impl_info_str();
  return out.c_str();
}
