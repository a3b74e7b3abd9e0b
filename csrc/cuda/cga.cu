// Local-window cascaded group attention: the torch-facing launcher of cga_kernel (cga.cuh).
#include <torch/library.h>

#include "cga.cuh"

namespace efficientvit {
namespace gpu {
namespace {

at::Tensor cga_cuda(const at::Tensor& x, const at::Tensor& qkv_weight, const at::Tensor& qkv_bias,
                    const at::Tensor& dw_weight, const at::Tensor& dw_bias,
                    const at::Tensor& attention_bias, const at::Tensor& proj_weight,
                    const at::Tensor& proj_bias, int64_t window_size, double scale,
                    bool residual) {
  const CgaDims dims = check_cga(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias,
                                 proj_weight, proj_bias, window_size);
  check_cuda_dtype(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat format = output_memory_format(x);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(format));
  if (out.numel() == 0) return out;

  const CgaLaunch plan = plan_cga(dims, x.element_size(), kSmemTarget, smem_limit());
  const at::Tensor xc = x.contiguous(format);
  const at::Tensor params[] = {qkv_weight.contiguous(), qkv_bias.contiguous(),
                               dw_weight.contiguous(),  dw_bias.contiguous(),
                               attention_bias.contiguous(), proj_weight.contiguous(),
                               proj_bias.contiguous()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  EFFICIENTVIT_DISPATCH(x.scalar_type(), "efficientvit_cga_cuda", [&] {
    using T = scalar_t;
    const CgaArgs<T> args = cga_args<T>(dims, plan, xc, format, out, params, scale, residual);
    allow_smem(cga_kernel<T>, plan.smem.bytes);
    cga_kernel<T><<<static_cast<unsigned>(plan.blocks), kThreads, plan.smem.bytes, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace gpu
}  // namespace efficientvit

TORCH_LIBRARY_IMPL(efficientvit, CUDA, m) { m.impl("cga", &efficientvit::gpu::cga_cuda); }
