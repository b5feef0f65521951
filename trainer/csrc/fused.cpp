// Fused CPU kernels for the trainer's element-wise work, as libtorch autograd functions.
//
// A training step on a CPU is mostly the frozen base's matrix products; most of the rest is
// element-wise work that libtorch runs as separate operators, each a pass over memory with its
// own autograd node and saved tensors: RMSNorm is six operators forward and more backward, a
// rotary embedding five (a `cat` of two halves among them), the SiLU gate three. Here each is one
// pass forward and one pass backward, with the same formulas (transformers' `LlamaRMSNorm`,
// `apply_rotary_pos_emb`, `silu(gate) * up`) up to rounding. LoRA's dropout is one pass that
// draws the trainer's counter-based mask as it goes (bit-identical to `dropout::mask`) and
// draws it again for the backward instead of keeping it. And the products with a frozen weight
// go to oneDNN, whose AVX-512 kernels run where libtorch's MKL does not pick its own.
//
// Only f32 CPU tensors are accepted (the trainer keeps its libtorch path on other devices and
// dtypes). The kernels are plain loops the compiler vectorises; on x86-64 with GCC each is also
// compiled for x86-64-v3 (AVX2, FMA) and v4 (AVX-512) and picked at load time. Rows are shared
// out with `at::parallel_for` (libtorch's own threads); every row is computed by one thread in a
// fixed order, so results do not depend on the thread count (they may differ in the last bits
// between CPU generations, where FMA contracts products and sums). The backward functions are
// not themselves differentiable: double backward is refused.
//
// The C entry points return a new tensor (owned by the caller, as tch's `Tensor::from_ptr`
// takes it) or null with the reason in `peftrt_fused_error()`: no exception crosses into Rust.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace at::native {
// oneDNN's matrix product, `result = beta * result + alpha * mat1 * mat2`: exported by
// libtorch_cpu (TORCH_API) though its header (ATen/native/mkldnn/Matmul.h) is not installed.
// In f32 it computes in f32 (libtorch's default "ieee" matmul precision sets no reduced-precision
// mode) and needs AVX-512 (or AVX-NE-CONVERT): elsewhere it throws, and the trainer keeps
// libtorch's own product.
void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                   float alpha);
}  // namespace at::native

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PEFTRT_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define PEFTRT_CLONES
#endif

namespace {

// Rows per `parallel_for` chunk: about 32k elements, libtorch's own grain for element-wise work.
int64_t grain_rows(int64_t row_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_len)); }

// The dot product of `n` values, in 16 interleaved partial sums (a form the compiler vectorises
// without reassociating anything itself).
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {0};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[j + l] * b[j + l];
  for (; j < n; ++j) acc[j & 15] += a[j] * b[j];
  float s = 0;
  for (int l = 0; l < 16; ++l) s += acc[l];
  return s;
}

// ---- RMSNorm (optionally after a residual add) ----

// For rows [begin, end) of width h: s = x + r (when r is given; written to `sum`), then
// y = w * (s * rstd) with rstd = 1 / sqrt(mean(s^2) + eps), as transformers' LlamaRMSNorm.
PEFTRT_CLONES void rms_norm_rows(const float* x, const float* r, const float* w, float* sum, float* y, float* rstd,
                                 int64_t begin, int64_t end, int64_t h, float eps) {
  for (int64_t i = begin; i < end; ++i) {
    const float* src = x + i * h;
    if (r != nullptr) {
      const float* ri = r + i * h;
      float* si = sum + i * h;
      for (int64_t j = 0; j < h; ++j) si[j] = src[j] + ri[j];
      src = si;
    }
    const float variance = dot(src, src, h) / static_cast<float>(h);
    const float rs = 1.0f / std::sqrt(variance + eps);
    rstd[i] = rs;
    float* yi = y + i * h;
    for (int64_t j = 0; j < h; ++j) yi[j] = w[j] * (src[j] * rs);
  }
}

// dx = rstd * (w * dy) - s * rstd^3 * sum(w * dy * s) / h, plus ds (the gradient reaching the
// sum directly, when given).
PEFTRT_CLONES void rms_norm_backward_rows(const float* s, const float* w, const float* rstd, const float* dy,
                                          const float* ds, float* dx, int64_t begin, int64_t end, int64_t h) {
  for (int64_t i = begin; i < end; ++i) {
    const float* si = s + i * h;
    const float* dyi = dy + i * h;
    float* dxi = dx + i * h;
    for (int64_t j = 0; j < h; ++j) dxi[j] = w[j] * dyi[j];
    const float rs = rstd[i];
    const float c = dot(dxi, si, h) * rs * rs * rs / static_cast<float>(h);
    if (ds != nullptr) {
      const float* dsi = ds + i * h;
      for (int64_t j = 0; j < h; ++j) dxi[j] = dxi[j] * rs - si[j] * c + dsi[j];
    } else {
      for (int64_t j = 0; j < h; ++j) dxi[j] = dxi[j] * rs - si[j] * c;
    }
  }
}

void check_f32_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.defined(), what, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU, not ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, what, " must be f32, not ", t.scalar_type());
}

// The backward passes are plain kernels, not differentiable themselves.
void check_no_double_backward(const char* what) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "fused ", what, ": double backward (create_graph) is not supported");
}

// The gradient of the norm's weight, when it is trained (the trainer's are frozen):
// sum over rows of dy * s * rstd.
at::Tensor norm_weight_grad(const at::Tensor& dy, const at::Tensor& s, const at::Tensor& rstd) {
  const int64_t h = s.size(-1);
  return (dy.reshape({-1, h}) * s.reshape({-1, h}) * rstd.unsqueeze(1)).sum(0);
}

// The norm of x (after adding r, when r is given): {y, s, rstd}, s = x + r (or x itself).
std::array<at::Tensor, 3> norm_forward(const at::Tensor& x, const at::Tensor* r, const at::Tensor& w, double eps) {
  check_f32_cpu(x, "the norm's input");
  check_f32_cpu(w, "the norm's weight");
  if (r != nullptr) {
    check_f32_cpu(*r, "the residual");
    TORCH_CHECK(r->sizes() == x.sizes(), "the residual ", r->sizes(), " and the input ", x.sizes(), " differ");
  }
  const int64_t h = x.size(-1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == h, "the norm's weight ", w.sizes(), " does not match width ", h);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const at::Tensor rc = r != nullptr ? r->contiguous() : at::Tensor();
  const int64_t rows = h == 0 ? 0 : xc.numel() / h;
  at::Tensor s = r != nullptr ? at::empty_like(xc) : xc;
  at::Tensor y = at::empty_like(xc);
  at::Tensor rstd = at::empty({rows}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* rp = r != nullptr ? rc.data_ptr<float>() : nullptr;
  float* sp = r != nullptr ? s.data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, grain_rows(h), [&](int64_t b, int64_t e) {
    rms_norm_rows(xp, rp, wc.data_ptr<float>(), sp, y.data_ptr<float>(), rstd.data_ptr<float>(), b, e, h,
                  static_cast<float>(eps));
  });
  return {y, s, rstd};
}

// The gradient reaching the norm's input (and the sum's, `ds`, when defined).
at::Tensor norm_backward(const at::Tensor& s, const at::Tensor& w, const at::Tensor& rstd, const at::Tensor& dy_in,
                         const at::Tensor& ds_in) {
  const int64_t h = s.size(-1), rows = h == 0 ? 0 : s.numel() / h;
  const at::Tensor dy = dy_in.defined() ? dy_in.contiguous() : at::zeros_like(s);
  const at::Tensor ds = ds_in.defined() ? ds_in.contiguous() : at::Tensor();
  const at::Tensor wc = w.contiguous();
  at::Tensor dx = at::empty_like(s);
  const float* dsp = ds.defined() ? ds.data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, grain_rows(h), [&](int64_t b, int64_t e) {
    rms_norm_backward_rows(s.data_ptr<float>(), wc.data_ptr<float>(), rstd.data_ptr<float>(), dy.data_ptr<float>(),
                           dsp, dx.data_ptr<float>(), b, e, h);
  });
  return dx;
}

struct RmsNorm : public torch::autograd::Function<RmsNorm> {
  // x [.., h], w [h].
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, double eps) {
    auto [y, s, rstd] = norm_forward(x, nullptr, w, eps);
    ctx->save_for_backward({s, w, rstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_double_backward("rms_norm");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &s = saved[0], &w = saved[1], &rstd = saved[2];
    at::Tensor dx = norm_backward(s, w, rstd, grads[0], at::Tensor());
    at::Tensor dw = ctx->needs_input_grad(1) ? norm_weight_grad(grads[0], s, rstd) : at::Tensor();
    return {dx, dw, at::Tensor()};
  }
};

struct AddRmsNorm : public torch::autograd::Function<AddRmsNorm> {
  // x and r [.., h], w [h]: {norm(x + r), x + r}.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& r, const at::Tensor& w,
                               double eps) {
    auto [y, s, rstd] = norm_forward(x, &r, w, eps);
    ctx->save_for_backward({s, w, rstd});
    return {y, s};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_double_backward("add_rms_norm");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &s = saved[0], &w = saved[1], &rstd = saved[2];
    at::Tensor dx = norm_backward(s, w, rstd, grads[0], grads[1]);
    at::Tensor dw = ctx->needs_input_grad(2) && grads[0].defined() ? norm_weight_grad(grads[0], s, rstd) : at::Tensor();
    // x and r reach the sum alike.
    return {dx, dx, dw, at::Tensor()};
  }
};

// ---- Rotary embedding ----

// x [b, t, heads, d] (rows of `heads * d`), tables [tb, t, d] with tb 1 or b:
// y = x * cos + rotate_half(x) * sin, with `signed_sin` = [-sin, sin] of the half angles (the
// sign of rotate_half folded in), i.e. y[j] = x[j] cos[j] + x[j ± d/2] signed_sin[j].
// Backward (`backward` set, x = dy): dx[j] = dy[j] cos[j] + dy[j ± d/2] signed_sin[j ± d/2].
// One head: y[j] = x[j] c[j] + x[j + half] s_lo[j], y[j + half] = x[j + half] c[j + half] + x[j] s_hi[j].
inline void rope_head(const float* __restrict x, const float* __restrict c, const float* __restrict s_lo,
                      const float* __restrict s_hi, float* __restrict y, int64_t half) {
  for (int64_t j = 0; j < half; ++j) {
    y[j] = x[j] * c[j] + x[j + half] * s_lo[j];
    y[j + half] = x[j + half] * c[j + half] + x[j] * s_hi[j];
  }
}

PEFTRT_CLONES void rope_rows(const float* x, const float* cos, const float* ssin, float* y, int64_t begin, int64_t end,
                             int64_t t, int64_t table_batches, int64_t heads, int64_t d, bool backward) {
  const int64_t half = d / 2;
  for (int64_t row = begin; row < end; ++row) {  // row = batch * t + position
    const int64_t table_row = table_batches == 1 ? row % t : row;
    const float* c = cos + table_row * d;
    const float* sn = ssin + table_row * d;
    const float* s_lo = backward ? sn + half : sn;
    const float* s_hi = backward ? sn : sn + half;
    for (int64_t hd = 0; hd < heads; ++hd)
      rope_head(x + (row * heads + hd) * d, c, s_lo, s_hi, y + (row * heads + hd) * d, half);
  }
}

void rope_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& ssin, at::Tensor& y, bool backward) {
  const int64_t b = x.size(0), t = x.size(1), heads = x.size(2), d = x.size(3);
  const int64_t rows = b * t;
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, rows, grain_rows(heads * d), [&](int64_t begin, int64_t end) {
    rope_rows(xp, cos.data_ptr<float>(), ssin.data_ptr<float>(), y.data_ptr<float>(), begin, end, t, cos.size(0),
              heads, d, backward);
  });
}

struct Rope : public torch::autograd::Function<Rope> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& ssin) {
    check_f32_cpu(x, "the rotary input");
    check_f32_cpu(cos, "the rotary cos table");
    check_f32_cpu(ssin, "the rotary sin table");
    TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "the rotary input must be [batch, seq, heads, even head_dim], not ",
                x.sizes());
    TORCH_CHECK(cos.dim() == 3 && cos.sizes() == ssin.sizes() && cos.size(1) == x.size(1) &&
                    cos.size(2) == x.size(3) && (cos.size(0) == 1 || cos.size(0) == x.size(0)),
                "rotary tables ", cos.sizes(), " / ", ssin.sizes(), " do not fit an input ", x.sizes());
    TORCH_CHECK(!cos.requires_grad() && !ssin.requires_grad(), "the rotary tables must not require gradients");
    const at::Tensor xc = x.contiguous(), cc = cos.contiguous(), sc = ssin.contiguous();
    at::Tensor y = at::empty_like(xc);
    rope_apply(xc, cc, sc, y, false);
    ctx->save_for_backward({cc, sc});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_double_backward("rope");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor dy = grads[0].contiguous();
    at::Tensor dx = at::empty_like(dy);
    rope_apply(dy, saved[0], saved[1], dx, true);
    return {dx, at::Tensor(), at::Tensor()};
  }
};

// ---- SiLU-gated product ----

// e^x in f32 for the sigmoid: x clamped to [-87, 88], x = n ln2 + r with |r| <= ln2/2
// (n rounded with the 1.5 * 2^23 shifter, ln2 split so n * ln2_hi is exact), e^r by its
// degree-7 Taylor polynomial (truncation below 1e-8 relative), times 2^n built in the exponent
// bits. A few ulp from the correctly rounded value; branch-free so that loops vectorise.
inline float exp_f32(float x) {
  // Written as selects (maxps/minps), which vectorise; std::min/max would branch. A NaN lands
  // on -87 (converting a NaN to int would be undefined); the callers multiply the result by
  // the NaN input, so NaN still comes out.
  x = x > -87.0f ? x : -87.0f;
  x = x < 88.0f ? x : 88.0f;
  const float shifter = 12582912.0f;
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// out = silu(g) * u = g * sigmoid(g) * u.
PEFTRT_CLONES void swiglu_rows(const float* g, const float* u, float* out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float sig = 1.0f / (1.0f + exp_f32(-g[i]));
    out[i] = (g[i] * sig) * u[i];
  }
}

// dg = dz * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))) (libtorch's silu_backward), du = dz * silu(g).
PEFTRT_CLONES void swiglu_backward_rows(const float* g, const float* u, const float* dz, float* dg, float* du,
                                        int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float sig = 1.0f / (1.0f + exp_f32(-g[i]));
    du[i] = dz[i] * (g[i] * sig);
    dg[i] = (dz[i] * u[i]) * (sig * (1.0f + g[i] * (1.0f - sig)));
  }
}

struct SwiGlu : public torch::autograd::Function<SwiGlu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& u) {
    check_f32_cpu(g, "the gate");
    check_f32_cpu(u, "the up projection");
    TORCH_CHECK(g.sizes() == u.sizes(), "the gate ", g.sizes(), " and the up projection ", u.sizes(), " differ");
    const at::Tensor gc = g.contiguous(), uc = u.contiguous();
    at::Tensor out = at::empty_like(gc);
    const float *gp = gc.data_ptr<float>(), *up = uc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, gc.numel(), 32768, [&](int64_t b, int64_t e) { swiglu_rows(gp, up, op, b, e); });
    ctx->save_for_backward({gc, uc});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_double_backward("swiglu");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &g = saved[0], &u = saved[1];
    const at::Tensor dz = grads[0].contiguous();
    at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
    const float *gp = g.data_ptr<float>(), *up = u.data_ptr<float>(), *dzp = dz.data_ptr<float>();
    float *dgp = dg.data_ptr<float>(), *dup = du.data_ptr<float>();
    at::parallel_for(0, g.numel(), 32768,
                     [&](int64_t b, int64_t e) { swiglu_backward_rows(gp, up, dzp, dgp, dup, b, e); });
    return {dg, du};
  }
};

// ---- LoRA dropout ----

// SplitMix64's output function (the trainer's `SplitMix64::mix`).
inline uint64_t splitmix64_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// y = x * mask for the elements of pairs [begin, end), the mask of `key` as the trainer's
// `dropout::mask` draws it: pair j's 64-bit draw is mix(key + j * gamma), element 2j takes its
// low 32 bits and 2j + 1 its high ones; an element is dropped (times 0) when its draw is below
// `threshold` and kept (times `keep`) otherwise. `n` is the element count.
PEFTRT_CLONES void dropout_pairs(const float* x, float* y, int64_t begin, int64_t end, int64_t n, uint64_t key,
                                 uint64_t threshold, float keep) {
  const uint64_t gamma = 0x9e3779b97f4a7c15ull;
  const int64_t whole = std::min(end, n / 2);
  for (int64_t j = begin; j < whole; ++j) {
    const uint64_t z = splitmix64_mix(key + static_cast<uint64_t>(j) * gamma);
    y[2 * j] = x[2 * j] * ((z & 0xffffffffull) < threshold ? 0.0f : keep);
    y[2 * j + 1] = x[2 * j + 1] * ((z >> 32) < threshold ? 0.0f : keep);
  }
  if (end > whole && n % 2 == 1) {  // the odd last element: the low half of the last draw
    const uint64_t z = splitmix64_mix(key + static_cast<uint64_t>(whole) * gamma);
    y[n - 1] = x[n - 1] * ((z & 0xffffffffull) < threshold ? 0.0f : keep);
  }
}

at::Tensor dropout_apply(const at::Tensor& x, uint64_t key, double p) {
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t n = xc.numel(), pairs = (n + 1) / 2;
  const auto threshold = static_cast<uint64_t>(std::llround(p * 4294967296.0));
  const auto keep = static_cast<float>(1.0 / (1.0 - p));
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, pairs, 16384,
                   [&](int64_t b, int64_t e) { dropout_pairs(xp, yp, b, e, n, key, threshold, keep); });
  return y;
}

struct Dropout : public torch::autograd::Function<Dropout> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t key, double p) {
    check_f32_cpu(x, "the dropout input");
    TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout probability ", p, " outside [0, 1)");
    ctx->saved_data["key"] = key;
    ctx->saved_data["p"] = p;
    return dropout_apply(x, static_cast<uint64_t>(key), p);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_double_backward("dropout");
    const auto key = static_cast<uint64_t>(ctx->saved_data["key"].toInt());
    const double p = ctx->saved_data["p"].toDouble();
    return {dropout_apply(grads[0], key, p), at::Tensor(), at::Tensor()};
  }
};

// ---- Products with a frozen weight, on oneDNN ----

// y [rows, out] = x [rows, in] * w [out, in]^T, by oneDNN (w^T is read in place: a transposed
// view is one of the layouts oneDNN takes without a copy).
at::Tensor onednn_mm(const at::Tensor& x, const at::Tensor& w_or_wt, int64_t cols) {
  at::Tensor y = at::empty({x.size(0), cols}, x.options());
  if (x.size(0) > 0) at::native::mkldnn_matmul(x, w_or_wt, y, 0.0f, 1.0f);
  return y;
}

// x * w^T for a weight that gets no gradient (a frozen base layer): libtorch's `linear` on its
// CPU BLAS, MKL, runs MKL's AVX2 kernels on AMD processors even where they have AVX-512, and
// oneDNN's AVX-512 kernels do the same product in f32 at twice the rate there (BENCHMARKS.md).
// Nothing but the weight is kept for the backward, which is dx = dy * w.
struct FrozenLinear : public torch::autograd::Function<FrozenLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w) {
    check_f32_cpu(x, "the input");
    check_f32_cpu(w, "the weight");
    TORCH_CHECK(w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1), "an input of shape ", x.sizes(),
                " does not fit a weight of shape ", w.sizes());
    TORCH_CHECK(!w.requires_grad(), "the weight of a frozen linear layer requires a gradient");
    const at::Tensor wc = w.contiguous();
    const at::Tensor y = onednn_mm(x.reshape({-1, w.size(1)}).contiguous(), wc.t(), w.size(0));
    ctx->save_for_backward({wc});
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = w.size(0);
    return y.view(sizes);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_double_backward("frozen linear");
    const at::Tensor w = ctx->get_saved_variables()[0];
    const at::Tensor& dy = grads[0];
    const at::Tensor dx = onednn_mm(dy.reshape({-1, w.size(0)}).contiguous(), w, w.size(1));
    std::vector<int64_t> sizes = dy.sizes().vec();
    sizes.back() = w.size(1);
    return {dx.view(sizes), at::Tensor()};
  }
};

thread_local std::string last_error;

// Keeps `msg` for `peftrt_fused_error`; never throws (out of memory leaves a fixed message).
void set_error(const char* msg) noexcept {
  try {
    last_error = msg;
  } catch (...) {
    last_error.clear();  // the Rust side reports an empty message as such
  }
}

template <class F>
int guarded(F&& f) noexcept {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    set_error(e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_error(e.what());
  } catch (...) {
    set_error("unknown C++ exception");
  }
  return -1;
}

}  // namespace

extern "C" {

// The reason the last call on this thread failed.
const char* peftrt_fused_error() { return last_error.c_str(); }

// *out = RMSNorm(x) with weight w.
int peftrt_fused_rms_norm(const at::Tensor* x, const at::Tensor* w, double eps, at::Tensor** out) {
  return guarded([&] { *out = new at::Tensor(RmsNorm::apply(*x, *w, eps)); });
}

// *sum = x + r; *out = RMSNorm(*sum) with weight w.
int peftrt_fused_add_rms_norm(const at::Tensor* x, const at::Tensor* r, const at::Tensor* w, double eps,
                              at::Tensor** sum, at::Tensor** out) {
  return guarded([&] {
    auto res = AddRmsNorm::apply(*x, *r, *w, eps);
    auto normed = std::make_unique<at::Tensor>(res[0]);
    auto total = std::make_unique<at::Tensor>(res[1]);
    *out = normed.release();
    *sum = total.release();
  });
}

// *out = x * cos + rotate_half(x) * sin for x [batch, seq, heads, head_dim].
int peftrt_fused_rope(const at::Tensor* x, const at::Tensor* cos, const at::Tensor* signed_sin, at::Tensor** out) {
  return guarded([&] { *out = new at::Tensor(Rope::apply(*x, *cos, *signed_sin)); });
}

// *out = silu(g) * u.
int peftrt_fused_swiglu(const at::Tensor* g, const at::Tensor* u, at::Tensor** out) {
  return guarded([&] { *out = new at::Tensor(SwiGlu::apply(*g, *u)); });
}

// *out = x * the dropout mask of `key` (probability p), the mask regenerated for the backward.
int peftrt_fused_dropout(const at::Tensor* x, uint64_t key, double p, at::Tensor** out) {
  return guarded([&] { *out = new at::Tensor(Dropout::apply(*x, static_cast<int64_t>(key), p)); });
}

// *out = x * w^T by oneDNN for a weight without gradient (the backward gives x's only).
int peftrt_fused_frozen_linear(const at::Tensor* x, const at::Tensor* w, at::Tensor** out) {
  return guarded([&] { *out = new at::Tensor(FrozenLinear::apply(*x, *w)); });
}

// 0 when oneDNN's f32 product runs on this CPU (tried on a small product), else -1 with the
// reason in `peftrt_fused_error()`. The caller keeps the answer.
int peftrt_fused_onednn_probe() {
  return guarded([] {
    const at::Tensor a = at::ones({4, 8}), b = at::ones({8, 3});
    at::Tensor c = at::empty({4, 3});
    at::native::mkldnn_matmul(a, b, c, 0.0f, 1.0f);
    TORCH_CHECK(c.eq(8.0f).all().item<bool>(), "oneDNN's product of ones is wrong");
  });
}

// e^x by the kernels' exp, for its test.
float peftrt_fused_exp(float x) { return exp_f32(x); }

}  // extern "C"
