// The patch embedding on CUDA: each 3x3 stride-2 convolution by cuDNN (through ATen, without
// its bias), then its bias and ReLU in one pass (bias_act_kernel, patch_embed.cuh).
#include <ATen/ops/conv2d.h>
#include <torch/library.h>

#include "patch_embed.cuh"

namespace efficientvit {
namespace gpu {
namespace {

// y = [relu](y + bias), in place where y is dense (as cuDNN returns it), else into a dense copy.
void bias_act_(at::Tensor& y, const at::Tensor& bias, bool relu) {
  if (y.numel() == 0) return;
  const at::MemoryFormat format = y.suggest_memory_format();
  if (!y.is_contiguous(format)) y = y.contiguous(format);
  const at::Tensor bc = bias.contiguous();
  const BiasActLaunch plan = plan_bias_act(y, format);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  EFFICIENTVIT_DISPATCH(y.scalar_type(), "efficientvit_bias_act_cuda", [&] {
    using T = scalar_t;
    const BiasActArgs<T> args = bias_act_args<T>(plan, y, bc, relu);
    const BiasActKernel<T> kernel = bias_act_kernel_for<T>(plan);
    kernel<<<static_cast<unsigned>(plan.blocks), kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor patch_embed_cuda(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                            bool final_relu) {
  check_patch_embed(x, weights, biases);
  check_cuda_dtype(x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = x;
  for (size_t l = 0; l < weights.size(); ++l) {
    y = at::conv2d(y, weights[l], /*bias=*/{}, /*stride=*/{2, 2}, /*padding=*/{1, 1});
    bias_act_(y, biases[l], final_relu || l + 1 < weights.size());
  }
  return y.contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace
}  // namespace gpu
}  // namespace efficientvit

TORCH_LIBRARY_IMPL(efficientvit, CUDA, m) {
  m.impl("patch_embed", &efficientvit::gpu::patch_embed_cuda);
}
