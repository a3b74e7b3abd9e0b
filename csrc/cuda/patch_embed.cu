// The patch embedding on CUDA: each 3x3 stride-2 convolution by cuDNN (through ATen, without
// its bias), then its bias and ReLU in one pass (bias_act_kernel, patch_embed.cuh).
#include <torch/library.h>

#include "patch_embed.cuh"

namespace efficientvit {
namespace gpu {
namespace {

at::Tensor patch_embed_cuda(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                            bool final_relu) {
  check_patch_embed(x, weights, biases);
  check_cuda_dtype(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  return patch_embed_chain(x, weights, biases, final_relu, [&](const BiasActLaunch& plan,
                                                               at::Tensor& y,
                                                               const at::Tensor& bias, bool relu) {
    EFFICIENTVIT_DISPATCH(y.scalar_type(), "efficientvit_bias_act_cuda", [&] {
      using T = scalar_t;
      const BiasActArgs<T> args = bias_act_args<T>(plan, y, bias, relu);
      const BiasActKernel<T> kernel = bias_act_kernel_for<T>(plan);
      kernel<<<static_cast<unsigned>(plan.blocks), kThreads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace
}  // namespace gpu
}  // namespace efficientvit

TORCH_LIBRARY_IMPL(efficientvit, CUDA, m) {
  m.impl("patch_embed", &efficientvit::gpu::patch_embed_cuda);
}
