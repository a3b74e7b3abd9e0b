// The ops' contract for the compiled backends: argument checks and the output layout, shared
// by CPU and CUDA so both reject the same inputs with the same messages. The fakes and the
// Triton kernels hold the same contract in Python (efficientvit_kernels/ops.py), and
// tests/test_contract.py checks that the two agree, message for message.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

namespace efficientvit {

// The tensor the parameters must match in device and dtype: x for an op, the first weight when
// the CPU kernels pack the weights ahead of the calls.
struct Like {
  const at::Tensor& tensor;
  const char* name;
};

inline void check_same(Like like, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == like.tensor.device(), "efficientvit: ", name, " is on ",
                    t.device(), " but ", like.name, " is on ", like.tensor.device());
  TORCH_CHECK_VALUE(t.scalar_type() == like.tensor.scalar_type(), "efficientvit: ", name,
                    " has dtype ", t.scalar_type(), " but ", like.name, " has dtype ",
                    like.tensor.scalar_type());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "efficientvit: ", name, " must have shape ", expected,
                    ", got ", t.sizes());
}

// The memory format of each op's output (patch_embed's excepted: always channels-last) and of
// the dense input the kernels read: channels-last where x is channels-last and not also
// contiguous (C == 1 or H == W == 1 make it both), else contiguous. A strided x is read through
// a dense copy in that format.
inline at::MemoryFormat output_memory_format(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

inline void check_input(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, "efficientvit: x must be 4-D (B, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()),
                    "efficientvit: x must be a floating-point tensor, got ", x.scalar_type());
}

// Sizes of a cga call, derived from its weights and checked against x.
struct CgaDims {
  int64_t batch, channels, height, width;
  int64_t heads, key_dim, value_dim, kernel, window;
};

// The parameters of cga for `channels` channels; returns the sizes but those of x.
inline CgaDims check_cga_params(int64_t channels, Like like, const at::Tensor& qkv_weight,
                                const at::Tensor& qkv_bias, const at::Tensor& dw_weight,
                                const at::Tensor& dw_bias, const at::Tensor& attention_bias,
                                const at::Tensor& proj_weight, const at::Tensor& proj_bias,
                                int64_t window_size) {
  CgaDims d{};
  d.channels = channels;
  TORCH_CHECK_VALUE(qkv_weight.dim() == 3,
                    "efficientvit: qkv_weight must be 3-D (heads, 2*kd+d, d), got ",
                    qkv_weight.sizes());
  TORCH_CHECK_VALUE(dw_weight.dim() == 4,
                    "efficientvit: dw_weight must be 4-D (heads, kd, K, K), got ",
                    dw_weight.sizes());
  d.heads = qkv_weight.size(0);
  TORCH_CHECK_VALUE(d.heads > 0 && d.channels % d.heads == 0, "efficientvit: ", d.heads,
                    " heads do not divide the ", d.channels, " channels of ", like.name);
  d.value_dim = d.channels / d.heads;
  d.key_dim = dw_weight.size(1);
  d.kernel = dw_weight.size(3);
  d.window = window_size;
  TORCH_CHECK_VALUE(window_size > 0, "efficientvit: window_size must be positive, got ",
                    window_size);
  TORCH_CHECK_VALUE(d.key_dim > 0, "efficientvit: the key dim (dw_weight.shape[1]) must be ",
                    "positive, got ", d.key_dim);
  TORCH_CHECK_VALUE(d.kernel % 2 == 1, "efficientvit: the query kernel size must be odd, got ",
                    d.kernel);
  check_shape(qkv_weight, {d.heads, 2 * d.key_dim + d.value_dim, d.value_dim}, "qkv_weight");
  check_shape(qkv_bias, {d.heads, 2 * d.key_dim + d.value_dim}, "qkv_bias");
  check_shape(dw_weight, {d.heads, d.key_dim, d.kernel, d.kernel}, "dw_weight");
  check_shape(dw_bias, {d.heads, d.key_dim}, "dw_bias");
  TORCH_CHECK_VALUE(attention_bias.sizes() == at::IntArrayRef({d.heads, window_size, window_size}),
                    "efficientvit: attention_bias must have shape (heads, window_size, ",
                    "window_size) = (", d.heads, ", ", window_size, ", ", window_size, "), got ",
                    attention_bias.sizes());
  check_shape(proj_weight, {d.channels, d.channels}, "proj_weight");
  check_shape(proj_bias, {d.channels}, "proj_bias");
  const at::Tensor* params[] = {&qkv_weight, &qkv_bias, &dw_weight, &dw_bias,
                                &attention_bias, &proj_weight, &proj_bias};
  const char* names[] = {"qkv_weight", "qkv_bias", "dw_weight", "dw_bias",
                         "attention_bias", "proj_weight", "proj_bias"};
  for (int i = 0; i < 7; ++i) check_same(like, *params[i], names[i]);
  return d;
}

inline CgaDims check_cga(const at::Tensor& x, const at::Tensor& qkv_weight,
                         const at::Tensor& qkv_bias, const at::Tensor& dw_weight,
                         const at::Tensor& dw_bias, const at::Tensor& attention_bias,
                         const at::Tensor& proj_weight, const at::Tensor& proj_bias,
                         int64_t window_size) {
  check_input(x);
  CgaDims d = check_cga_params(x.size(1), {x, "x"}, qkv_weight, qkv_bias, dw_weight, dw_bias,
                               attention_bias, proj_weight, proj_bias, window_size);
  d.batch = x.size(0), d.height = x.size(2), d.width = x.size(3);
  return d;
}

inline void check_dwconv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_input(x);
  TORCH_CHECK_VALUE(weight.dim() == 3, "efficientvit: dwconv weight must be 3-D (C, K, K), got ",
                    weight.sizes());
  const int64_t K = weight.size(1);
  TORCH_CHECK_VALUE(K % 2 == 1, "efficientvit: the dwconv kernel size must be odd, got ", K);
  check_shape(weight, {x.size(1), K, K}, "weight");
  check_shape(bias, {x.size(1)}, "bias");
  check_same({x, "x"}, weight, "weight");
  check_same({x, "x"}, bias, "bias");
}

// The parameters of patch_embed for an x of `channels` channels.
inline void check_patch_embed_params(int64_t channels, Like like, at::TensorList weights,
                                   at::TensorList biases) {
  TORCH_CHECK_VALUE(!weights.empty(), "efficientvit: patch_embed needs at least one convolution");
  TORCH_CHECK_VALUE(weights.size() == biases.size(),
                    "efficientvit: patch_embed takes a bias per weight, got ", weights.size(),
                    " weights and ", biases.size(), " biases");
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor &weight = weights[l], &bias = biases[l];
    const std::string w = "weights[" + std::to_string(l) + "]";
    const std::string b = "biases[" + std::to_string(l) + "]";
    TORCH_CHECK_VALUE(weight.dim() == 4, "efficientvit: patch_embed ", w,
                      " must be 4-D (Co, Ci, 3, 3), got ", weight.sizes());
    check_shape(weight, {weight.size(0), channels, 3, 3}, w.c_str());
    check_shape(bias, {weight.size(0)}, b.c_str());
    check_same(like, weight, w.c_str());
    check_same(like, bias, b.c_str());
    channels = weight.size(0);
  }
}

inline void check_patch_embed(const at::Tensor& x, at::TensorList weights, at::TensorList biases) {
  check_input(x);
  check_patch_embed_params(x.size(1), {x, "x"}, weights, biases);
}

// The parameters of ffn, and of squeeze_excite (the same two layers over channels, on the
// image's mean), for `channels` channels.
inline void check_ffn_params(int64_t channels, Like like, const at::Tensor& w1,
                             const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  TORCH_CHECK_VALUE(w1.dim() == 2, "efficientvit: w1 must be 2-D (hidden, C), got ", w1.sizes());
  const int64_t M = w1.size(0);
  check_shape(w1, {M, channels}, "w1");
  check_shape(b1, {M}, "b1");
  check_shape(w2, {channels, M}, "w2");
  check_shape(b2, {channels}, "b2");
  check_same(like, w1, "w1");
  check_same(like, b1, "b1");
  check_same(like, w2, "w2");
  check_same(like, b2, "b2");
}

inline void check_ffn(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                      const at::Tensor& w2, const at::Tensor& b2) {
  check_input(x);
  check_ffn_params(x.size(1), {x, "x"}, w1, b1, w2, b2);
}

// The parameters of conv1x1 for `channels` input channels.
inline void check_conv1x1_params(int64_t channels, Like like, const at::Tensor& weight,
                                   const at::Tensor& bias,
                                   const std::optional<at::Tensor>& dw_weight,
                                   const std::optional<at::Tensor>& dw_bias) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "efficientvit: conv1x1 weight must be 2-D (Co, C), got ",
                    weight.sizes());
  const int64_t Co = weight.size(0);
  check_shape(weight, {Co, channels}, "weight");
  check_shape(bias, {Co}, "bias");
  check_same(like, weight, "weight");
  check_same(like, bias, "bias");
  TORCH_CHECK_VALUE(dw_weight.has_value() == dw_bias.has_value(),
                    "efficientvit: conv1x1 takes dw_weight and dw_bias together, or neither");
  if (!dw_weight) return;
  check_shape(*dw_weight, {Co, 3, 3}, "dw_weight");
  check_shape(*dw_bias, {Co}, "dw_bias");
  check_same(like, *dw_weight, "dw_weight");
  check_same(like, *dw_bias, "dw_bias");
}

inline void check_conv1x1(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const std::optional<at::Tensor>& dw_weight,
                            const std::optional<at::Tensor>& dw_bias) {
  check_input(x);
  check_conv1x1_params(x.size(1), {x, "x"}, weight, bias, dw_weight, dw_bias);
}

}  // namespace efficientvit
