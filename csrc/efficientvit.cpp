// The efficientvit op library: every op's schema, defined once. Each backend
// (csrc/cpu, csrc/cuda, and the Triton kernels from Python) registers an
// implementation of these schemas; efficientvit_kernels/ops.py documents them and
// registers their fake (meta) implementations. Every op returns its output in the memory
// format output_memory_format(x) names (checks.h).
#include <torch/library.h>

#include "inference_only.h"

TORCH_LIBRARY(efficientvit, m) {
  // Local-window cascaded group attention on folded parameters (see docs/design.md):
  // x (B, C, H, W); qkv_weight (h, 2kd+d, d), qkv_bias (h, 2kd+d), d = C/h;
  // dw_weight (h, kd, K, K), dw_bias (h, kd); attention_bias (h, ws, ws);
  // proj_weight (C, C), proj_bias (C). Returns [x +] attention(x), shaped like x.
  m.def(
      "cga(Tensor x, Tensor qkv_weight, Tensor qkv_bias, Tensor dw_weight, Tensor dw_bias, "
      "Tensor attention_bias, Tensor proj_weight, Tensor proj_bias, int window_size, float scale, "
      "bool residual) -> Tensor");
  // Depthwise KxK convolution with zero padding K//2: [x +] [relu](dwconv(x) + bias);
  // weight (C, K, K), bias (C).
  m.def("dwconv(Tensor x, Tensor weight, Tensor bias, bool relu, bool residual) -> Tensor");
  // Pointwise MLP: [x +] w2 relu(w1 x + b1) + b2; w1 (M, C), b1 (M), w2 (C, M), b2 (C).
  m.def("ffn(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, bool residual) -> Tensor");
  // An EfficientViT block's residual depthwise convolution, then its residual FFN:
  // y + ffn(y) with y = x + dwconv(x) + dw_bias; dw_weight (C, K, K), dw_bias (C), the rest as
  // ffn's. Kernels: Triton (one kernel in fp16/bf16: y passes through the output's tile in
  // cache); Triton's fp32, CPU and CUDA run the dwconv and ffn kernels in turn (ops.py).
  m.def(
      "dwconv_ffn(Tensor x, Tensor dw_weight, Tensor dw_bias, Tensor w1, Tensor b1, Tensor w2, "
      "Tensor b2) -> Tensor");
  // The patch embedding: a chain of 3x3 stride-2 convolutions with zero padding 1,
  // x = [relu](conv(x, weights[l]) + biases[l]), each but the last with its ReLU (the last with
  // it when final_relu); weights[l] (C_l, C_{l-1}, 3, 3), C_{-1} = x's channels. Returns the
  // last convolution's output, always channels-last. Kernels: CPU (the others never reach
  // memory) and Triton; on CUDA the dispatcher runs its PyTorch definition (ops.py).
  m.def("patch_embed(Tensor x, Tensor[] weights, Tensor[] biases, bool final_relu) -> Tensor");
  // A 1x1 convolution: y = [relu](weight x + bias); weight (Co, C), bias (Co).
  // Returns y (B, Co, H, W); or, given dw_weight (Co, 3, 3) and dw_bias (Co),
  // relu(dwconv3x3(y) + dw_bias), depthwise, stride 2, zero padding 1 (B, Co, ceil(H/2),
  // ceil(W/2)), without writing y to memory (PatchMerging's first half). Kernels: CPU and
  // Triton; on CUDA the dispatcher runs its PyTorch definition (ops.py).
  m.def(
      "conv1x1(Tensor x, Tensor weight, Tensor bias, bool relu, Tensor? dw_weight=None, "
      "Tensor? dw_bias=None) -> Tensor");
  // Squeeze-excite: x * sigmoid(w2 relu(w1 mean_hw(x) + b1) + b2), one scale per image and
  // channel; w1 (R, C), b1 (R), w2 (C, R), b2 (C) (PatchMerging's, R = C / 4). Kernels: CPU
  // and Triton; on CUDA the dispatcher runs its PyTorch definition (ops.py).
  m.def("squeeze_excite(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor");
}

TORCH_LIBRARY_IMPL(efficientvit, Autograd, m) {
  for (const char* op :
       {"cga", "dwconv", "ffn", "dwconv_ffn", "patch_embed", "conv1x1", "squeeze_excite"})
    m.impl(op, efficientvit::inference_only());
}
