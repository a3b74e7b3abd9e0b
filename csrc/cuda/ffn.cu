// Pointwise MLP: the torch-facing launcher of ffn_kernel (ffn.cuh).
#include <torch/library.h>

#include "ffn.cuh"

namespace efficientvit {
namespace gpu {
namespace {

at::Tensor ffn_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                    const at::Tensor& w2, const at::Tensor& b2, bool residual) {
  check_ffn(x, w1, b1, w2, b2);
  check_cuda_dtype(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat format = output_memory_format(x);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(format));
  if (out.numel() == 0) return out;

  const FfnLaunch plan = plan_ffn(x, w1.size(0), kSmemTarget, smem_limit());
  const at::Tensor xc = x.contiguous(format);
  const at::Tensor w1c = w1.contiguous(), b1c = b1.contiguous(), w2c = w2.contiguous(),
                   b2c = b2.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  EFFICIENTVIT_DISPATCH(x.scalar_type(), "efficientvit_ffn_cuda", [&] {
    using T = scalar_t;
    const FfnArgs<T> args = ffn_args<T>(plan, xc, format, out, w1c, b1c, w2c, b2c, residual);
    allow_smem(ffn_kernel<T>, plan.smem.bytes);
    ffn_kernel<T><<<static_cast<unsigned>(plan.blocks), kThreads, plan.smem.bytes, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace gpu
}  // namespace efficientvit

TORCH_LIBRARY_IMPL(efficientvit, CUDA, m) { m.impl("ffn", &efficientvit::gpu::ffn_cuda); }
