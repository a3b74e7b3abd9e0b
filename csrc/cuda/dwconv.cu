// Depthwise KxK convolution: the torch-facing launcher of dwconv_kernel (dwconv.cuh).
#include <torch/library.h>

#include "dwconv.cuh"

namespace efficientvit {
namespace gpu {
namespace {

at::Tensor dwconv_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       bool relu, bool residual) {
  check_dwconv(x, weight, bias);
  check_cuda_dtype(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat format = output_memory_format(x);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(format));
  if (out.numel() == 0) return out;

  const at::Tensor xc = x.contiguous(format), taps = dwconv_taps(weight),
                   bc = bias.contiguous();
  const DwconvLaunch plan = plan_dwconv(xc, format, out);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  EFFICIENTVIT_DISPATCH(x.scalar_type(), "efficientvit_dwconv_cuda", [&] {
    using T = scalar_t;
    const DwconvArgs<T> args = dwconv_args<T>(plan, xc, format, out, taps, bc, relu, residual);
    const DwconvKernel<T> kernel = dwconv_kernel_for<T>(plan);
    kernel<<<static_cast<unsigned>(plan.blocks), kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace gpu
}  // namespace efficientvit

TORCH_LIBRARY_IMPL(efficientvit, CUDA, m) { m.impl("dwconv", &efficientvit::gpu::dwconv_cuda); }
