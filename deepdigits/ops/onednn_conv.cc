// 3x3 VALID, stride-1 convolutions through oneDNN (NHWC activations, HWIO kernels) as XLA
// FFI handlers for the CPU: forward (with the bias added), input gradient, and kernel and
// bias gradients (in one pass), in float32, and in bfloat16 with float32 accumulation,
// float32 kernels and biases in and float32 kernel and bias gradients out.
// Built by setup.py, loaded and registered by deepdigits/ops/onednn_conv.py; XLA:CPU has no
// oneDNN convolution of its own, and oneDNN's direct convolutions need no im2col copies.
// Also bfloat16 matmuls with float32 accumulation (the dense layers in bfloat16,
// deepdigits/ops/onednn_dense.py), which oneDNN runs on AMX or AVX512-BF16.
//
// Threads: every oneDNN call here runs on one thread, and a call's batch (a matmul's rows)
// is cut into as many chunks as XLA's intra-op pool has threads; the calling thread and
// the pool's threads take the chunks in turn (RunChunks). oneDNN's own OpenMP team would
// run beside XLA's threads, which go on with other parts of the step: more threads than
// cores, and an OpenMP team waits at each barrier for a thread the OS has set aside.
// A kernel gradient is the sum of its chunks' partial gradients, added in chunk order, so
// that it does not depend on which thread took which chunk.
#include <omp.h>

#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"
#include "thread_chunks.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

using deepdigits::Range;
using deepdigits::RunChunks;
using deepdigits::Split;
using deepdigits::Threads;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// oneDNN sizes its primitives' work for the OpenMP thread count when it creates them and
// runs them on that many threads: one, on every thread that creates or runs them here.
void OneOpenMPThread() {
  thread_local bool set = false;
  if (!set) {
    omp_set_num_threads(1);
    set = true;
  }
}

// Primitives use a scratchpad the caller provides, so that two threads can run the same
// primitive at once (a library-owned scratchpad belongs to the primitive).
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

memory Scratchpad(const memory::desc& desc) {
  thread_local std::vector<uint8_t> buffer;
  if (buffer.size() < desc.get_size()) buffer.resize(desc.get_size());
  return memory(desc, Engine(), buffer.data());
}

// Runs body(0 .. count-1) as RunChunks does, each chunk on one OpenMP thread.
std::string RunDnnlChunks(ffi::ThreadPool& pool, int count, std::function<void(int)> body) {
  return RunChunks(pool, count, [&body](int i) {
    OneOpenMPThread();
    body(i);
  });
}

ffi::Error Failed(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInternal, "oneDNN: " + what);
}

// A layer's shapes (n: the images of one chunk) and its activations' data type (f32 or
// bf16); kernels and kernel gradients are f32 in memory either way.
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
  Shapes with_batch(int64_t images) const { return {images, h, w, c, o, act}; }
  // Bytes of one image's input and output, to step through a batch chunk by chunk.
  int64_t src_image_bytes() const {
    return h * w * c * static_cast<int64_t>(memory::data_type_size(act));
  }
  int64_t dst_image_bytes() const {
    return (h - 2) * (w - 2) * o * static_cast<int64_t>(memory::data_type_size(act));
  }
};

// The three primitives for one chunk's shapes.
struct Prims {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::convolution_backward_weights bwd_weights;
};

// The value for `key`, made once by make(key) and kept: creating a primitive JIT-compiles
// it. Made on a thread with one OpenMP thread, as the primitives will run.
template <typename Value, typename Key, typename Make>
Value& Cached(const Key& key, Make make) {
  OneOpenMPThread();
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Value>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[key];
  if (!slot) slot = std::make_unique<Value>(make(key));
  return *slot;
}

Prims MakePrims(const Shapes& s) {
  auto& eng = Engine();
  auto attr = UserScratchpad();
  memory::dims strides = {1, 1}, pad = {0, 0};
  Prims p;
  p.fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      s.src(), s.wei(tag::any, s.act), s.bias(), s.dst(), strides, pad, pad, attr);
  p.fwd = dnnl::convolution_forward(p.fwd_pd);
  p.bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, s.src(), s.wei(tag::any, s.act), s.dst(),
      strides, pad, pad, p.fwd_pd, attr);
  p.bwd_data = dnnl::convolution_backward_data(p.bwd_data_pd);
  // Kernel and bias gradients accumulate and stay in f32, whatever the activations' type.
  p.bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, s.src(), s.wei(tag::any, dt::f32), s.bias(),
      s.dst(), strides, pad, pad, p.fwd_pd, attr);
  p.bwd_weights = dnnl::convolution_backward_weights(p.bwd_weights_pd);
  return p;
}

Prims& GetPrims(const Shapes& s) { return Cached<Prims>(s, MakePrims); }

// A call's chunks: their ranges of images, and the primitives for each chunk's batch size
// (at most two sizes).
struct LayerChunks {
  std::vector<Range> ranges;
  std::vector<Prims*> prims;
  LayerChunks(const Shapes& whole, int64_t parts) : ranges(Split(whole.n, parts)) {
    for (const auto& r : ranges) prims.push_back(&GetPrims(whole.with_batch(r.size)));
  }
};

// An f32 kernel in HWIO, reordered into the layout and type a primitive asks for (or used
// as is); one reorder for each distinct layout among the chunks' primitives.
class KernelIn {
 public:
  KernelIn(const Shapes& s, float* hwio) : user_(s.wei(tag::hwio, dt::f32), Engine(), hwio) {}
  memory For(const memory::desc& desc) {
    if (desc == user_.get_desc()) return user_;
    for (const auto& m : reordered_)
      if (m.get_desc() == desc) return m;
    memory wanted(desc, Engine());
    dnnl::stream st(Engine());
    dnnl::reorder(user_, wanted).execute(st, user_, wanted);
    st.wait();
    reordered_.push_back(wanted);
    return reordered_.back();
  }

 private:
  memory user_;
  std::vector<memory> reordered_;
};

uint8_t* At(void* base, int64_t offset) { return static_cast<uint8_t*>(base) + offset; }

template <ffi::DataType T>
constexpr dt Act() { return T == ffi::DataType::BF16 ? dt::bf16 : dt::f32; }

template <ffi::DataType T>
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<T> x, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<T> y) {
  try {
    auto d = x.dimensions(); auto kd = k.dimensions();
    Shapes s{d[0], d[1], d[2], d[3], kd[3], Act<T>()};
    LayerChunks chunks(s, Threads(pool));
    KernelIn kernel(s, k.typed_data());
    std::vector<memory> weights;
    for (auto* p : chunks.prims) weights.push_back(kernel.For(p->fwd_pd.weights_desc()));
    memory bias(s.bias(), Engine(), b.typed_data());
    auto error = RunDnnlChunks(pool, chunks.ranges.size(), [&](int i) {
      const Range& r = chunks.ranges[i];
      const Prims& p = *chunks.prims[i];
      Shapes c = s.with_batch(r.size);
      dnnl::stream st(Engine());
      memory src(c.src(), Engine(), At(x.untyped_data(), r.start * s.src_image_bytes()));
      memory dst(c.dst(), Engine(), At(y->untyped_data(), r.start * s.dst_image_bytes()));
      p.fwd.execute(st, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights[i]},
                         {DNNL_ARG_BIAS, bias}, {DNNL_ARG_DST, dst},
                         {DNNL_ARG_SCRATCHPAD, Scratchpad(p.fwd_pd.scratchpad_desc())}});
      st.wait();
    });
    if (!error.empty()) return Failed(error);
  } catch (const std::exception& e) {
    return Failed(e.what());
  }
  return ffi::Error::Success();
}

template <ffi::DataType T>
ffi::Error InputGrad(ffi::ThreadPool pool, ffi::Buffer<T> dy, ffi::Buffer<ffi::F32> k,
                     ffi::ResultBuffer<T> dx) {
  try {
    auto d = dx->dimensions(); auto kd = k.dimensions();
    Shapes s{d[0], d[1], d[2], d[3], kd[3], Act<T>()};
    LayerChunks chunks(s, Threads(pool));
    KernelIn kernel(s, k.typed_data());
    std::vector<memory> weights;
    for (auto* p : chunks.prims) weights.push_back(kernel.For(p->bwd_data_pd.weights_desc()));
    auto error = RunDnnlChunks(pool, chunks.ranges.size(), [&](int i) {
      const Range& r = chunks.ranges[i];
      const Prims& p = *chunks.prims[i];
      Shapes c = s.with_batch(r.size);
      dnnl::stream st(Engine());
      memory diff_dst(c.dst(), Engine(), At(dy.untyped_data(), r.start * s.dst_image_bytes()));
      memory diff_src(c.src(), Engine(), At(dx->untyped_data(), r.start * s.src_image_bytes()));
      p.bwd_data.execute(st, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, weights[i]},
                              {DNNL_ARG_DIFF_SRC, diff_src},
                              {DNNL_ARG_SCRATCHPAD,
                               Scratchpad(p.bwd_data_pd.scratchpad_desc())}});
      st.wait();
    });
    if (!error.empty()) return Failed(error);
  } catch (const std::exception& e) {
    return Failed(e.what());
  }
  return ffi::Error::Success();
}

// Each chunk's kernel and bias gradients land in HWIO f32 (the first chunk's in the
// results, the others' in buffers of their own), then the others are added in chunk order.
template <ffi::DataType T>
ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<T> x, ffi::Buffer<T> dy,
                      ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> db) {
  try {
    auto d = x.dimensions(); auto kd = dk->dimensions();
    Shapes s{d[0], d[1], d[2], d[3], kd[3], Act<T>()};
    LayerChunks chunks(s, Threads(pool));
    const int64_t kernel_size = 9 * s.c * s.o, count = chunks.ranges.size();
    std::vector<float> partial((count - 1) * (kernel_size + s.o));
    auto kernel_out = [&](int64_t i) {
      return i == 0 ? dk->typed_data() : partial.data() + (i - 1) * (kernel_size + s.o);
    };
    auto bias_out = [&](int64_t i) {
      return i == 0 ? db->typed_data() : kernel_out(i) + kernel_size;
    };
    auto error = RunDnnlChunks(pool, count, [&](int i) {
      const Range& r = chunks.ranges[i];
      const Prims& p = *chunks.prims[i];
      Shapes c = s.with_batch(r.size);
      dnnl::stream st(Engine());
      memory src(c.src(), Engine(), At(x.untyped_data(), r.start * s.src_image_bytes()));
      memory diff_dst(c.dst(), Engine(), At(dy.untyped_data(), r.start * s.dst_image_bytes()));
      memory user(s.wei(tag::hwio, dt::f32), Engine(), kernel_out(i));
      memory diff_bias(s.bias(), Engine(), bias_out(i));
      auto desc = p.bwd_weights_pd.diff_weights_desc();
      bool direct = desc == user.get_desc();
      memory diff_weights = direct ? user : memory(desc, Engine());
      p.bwd_weights.execute(
          st, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
               {DNNL_ARG_DIFF_WEIGHTS, diff_weights}, {DNNL_ARG_DIFF_BIAS, diff_bias},
               {DNNL_ARG_SCRATCHPAD, Scratchpad(p.bwd_weights_pd.scratchpad_desc())}});
      if (!direct) dnnl::reorder(diff_weights, user).execute(st, diff_weights, user);
      st.wait();
    });
    if (!error.empty()) return Failed(error);
    float* kernel = dk->typed_data();
    float* bias = db->typed_data();
    for (int64_t i = 1; i < count; ++i) {
      const float* more = kernel_out(i);
      for (int64_t j = 0; j < kernel_size; ++j) kernel[j] += more[j];
      const float* more_bias = bias_out(i);
      for (int64_t j = 0; j < s.o; ++j) bias[j] += more_bias[j];
    }
  } catch (const std::exception& e) {
    return Failed(e.what());
  }
  return ffi::Error::Success();
}

// A bf16 matmul's shapes: out[m, n] = a[m, k] @ b[k, n], either operand stored transposed
// (a as [k, lda], b as [n, k]), out in f32 or bf16. A chunk of the rows of a transposed a
// is a block of its stored columns, lda (a's full row count) apart.
struct MatmulShapes {
  int64_t m, k, n;
  bool ta, tb;
  dt out;
  int64_t lda = 0;  // where ta: the stored rows' length; 0 otherwise
  bool operator<(const MatmulShapes& o) const {
    return std::tie(m, k, n, ta, tb, out, lda) <
           std::tie(o.m, o.k, o.n, o.ta, o.tb, o.out, o.lda);
  }
  memory::desc a() const {
    return ta ? memory::desc({m, k}, dt::bf16, memory::dims{1, lda})
              : memory::desc({m, k}, dt::bf16, tag::ab);
  }
  memory::desc b() const { return memory::desc({k, n}, dt::bf16, tb ? tag::ba : tag::ab); }
  memory::desc c() const { return memory::desc({m, n}, out, tag::ab); }
  MatmulShapes rows(int64_t count) const { return {count, k, n, ta, tb, out, lda}; }
};

struct MatmulPrim {
  dnnl::matmul::primitive_desc pd;
  dnnl::matmul prim;
};

MatmulPrim& GetMatmul(const MatmulShapes& s) {
  return Cached<MatmulPrim>(s, [](const MatmulShapes& s) {
    dnnl::matmul::primitive_desc pd(Engine(), s.a(), s.b(), s.c(), UserScratchpad());
    return MatmulPrim{pd, dnnl::matmul(pd)};
  });
}

// Matmuls of fewer multiply-adds than this run as one chunk (the second dense layer's).
constexpr int64_t kMinChunkedMatmul = int64_t{1} << 22;

template <ffi::DataType Out>
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                  ffi::ResultBuffer<Out> c, bool transpose_a, bool transpose_b) {
  try {
    auto ad = a.dimensions(); auto cd = c->dimensions();
    MatmulShapes s{cd[0], transpose_a ? ad[0] : ad[1], cd[1], transpose_a, transpose_b,
                   Out == ffi::DataType::BF16 ? dt::bf16 : dt::f32, transpose_a ? cd[0] : 0};
    auto ranges = Split(s.m, s.m * s.k * s.n < kMinChunkedMatmul ? 1 : Threads(pool));
    std::vector<MatmulPrim*> prims;
    for (const auto& r : ranges) prims.push_back(&GetMatmul(s.rows(r.size)));
    const int64_t a_row_bytes = transpose_a ? 2 : 2 * s.k;  // bf16: 2 bytes
    const int64_t c_row_bytes = s.n * static_cast<int64_t>(memory::data_type_size(s.out));
    auto error = RunDnnlChunks(pool, ranges.size(), [&](int i) {
      const Range& r = ranges[i];
      const MatmulPrim& p = *prims[i];
      MatmulShapes chunk = s.rows(r.size);
      dnnl::stream st(Engine());
      memory src(chunk.a(), Engine(), At(a.untyped_data(), r.start * a_row_bytes));
      memory wei(chunk.b(), Engine(), b.untyped_data());
      memory dst(chunk.c(), Engine(), At(c->untyped_data(), r.start * c_row_bytes));
      p.prim.execute(st, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst},
                          {DNNL_ARG_SCRATCHPAD, Scratchpad(p.pd.scratchpad_desc())}});
      st.wait();
    });
    if (!error.empty()) return Failed(error);
  } catch (const std::exception& e) {
    return Failed(e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

#define DEEPDIGITS_HANDLERS(SUFFIX, T)                                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepdigitsConvForward##SUFFIX, Forward<T>,                  \
                                ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<T>>()                      \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<T>>());   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepdigitsConvInputGrad##SUFFIX, InputGrad<T>,              \
                                ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<T>>()                      \
                                    .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<T>>());   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepdigitsConvKernelGrad##SUFFIX, KernelGrad<T>,            \
                                ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<T>>()                      \
                                    .Arg<ffi::Buffer<T>>().Ret<ffi::Buffer<ffi::F32>>()     \
                                    .Ret<ffi::Buffer<ffi::F32>>());

DEEPDIGITS_HANDLERS(F32, ffi::DataType::F32)
DEEPDIGITS_HANDLERS(BF16, ffi::DataType::BF16)

#define DEEPDIGITS_MATMUL_HANDLER(SUFFIX, OUT)                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepdigitsMatmulBF16To##SUFFIX, Matmul<OUT>,                \
                                ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::BF16>>()              \
                                    .Arg<ffi::Buffer<ffi::BF16>>().Ret<ffi::Buffer<OUT>>()  \
                                    .Attr<bool>("transpose_a").Attr<bool>("transpose_b"));

DEEPDIGITS_MATMUL_HANDLER(F32, ffi::DataType::F32)
DEEPDIGITS_MATMUL_HANDLER(BF16, ffi::DataType::BF16)

// Which oneDNN implementation runs a bf16 matmul of these shapes (out f32), e.g.
// "brg_matmul:avx512_core_amx", for the benchmark's report.
extern "C" const char* DeepdigitsMatmulImpl(int m, int k, int n) {
  static std::string out;
  try {
    out = GetMatmul(MatmulShapes{m, k, n, false, false, dt::f32}).pd.impl_info_str();
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
