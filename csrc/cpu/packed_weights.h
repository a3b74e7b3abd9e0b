// Weights packed once for a CPU kernel, ahead of the calls: a private detail of the CPU backend.
// The ops pack through cached_packing (below), as the op X_pack (parameters) does, which returns
// the PackedWeights (schemas in packed_weights.cpp, namespace efficientvit_cpu), whose method
// run(x, flag) computes op X on x. The tensors are in the kernel's layout (transposed, padded to
// the running instruction-set level's vector width, ...) and stay inside the object; the sizes
// the packing fixed travel with them, so no call can contradict them.
// (run is a method, not an op taking the object: a custom-class argument costs an op call from
// Python ~25 us more than a method call does, several times a small kernel's time.)
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/FunctionRef.h>
#include <torch/custom_class.h>

#include "cpu/isa.h"

#include <optional>
#include <string>
#include <vector>

namespace efficientvit::cpu {

// The tensors, copied into memory kept for packed weights: each packing's tensors one after the
// other, in slabs advised to be backed by 2 MiB pages (Linux's transparent huge pages; 4 KiB
// pages where the system refuses). At batch 1 a forward reads its weights from memory: one core
// read a stream at 17 GB/s on 4 KiB pages and at 30 GB/s on 2 MiB pages (the hardware
// prefetchers stop at every page), and M0's, M2's, M4's and M5's batch-1 forwards ran 2-5%
// faster.
std::vector<at::Tensor> in_weight_memory(std::vector<at::Tensor> tensors);

struct PackedWeights : torch::CustomClassHolder {
  // The op's kernel on packed weights; flag is the op's one flag argument (cga, ffn: residual;
  // conv1x1: relu; patch_embed: final_relu; squeeze_excite has none).
  using Kernel = at::Tensor (*)(const at::Tensor& x, const PackedWeights& weights, bool flag);

  PackedWeights(std::string op, Kernel kernel, std::vector<at::Tensor> tensors,
                std::vector<int64_t> sizes, int64_t channels, at::ScalarType dtype)
      : op(std::move(op)), name("efficientvit_cpu::" + this->op + "_packed"), kernel(kernel),
        tensors(in_weight_memory(std::move(tensors))), sizes(std::move(sizes)), channels(channels),
        dtype(dtype) {}

  // Checks x (4-D, on CPU, the weights' dtype and input channels; no gradient asked for) and
  // computes the op on it.
  at::Tensor run(const at::Tensor& x, bool flag) const;

  std::string op;                   // the op they were packed for
  std::string name;                 // the kernel's, in profiles and errors
  Kernel kernel;
  std::vector<at::Tensor> tensors;  // in the layout its kernel reads
  std::vector<int64_t> sizes;       // the op's sizes, in the order its packing names them
  int64_t channels;                 // x's channels
  at::ScalarType dtype;             // the weights' dtype: x's must match
};

using Packed = c10::intrusive_ptr<PackedWeights>;

// A weight whose tensor is held (a Program holds its weights), so that it can change only in
// place (its version counter) or through .data / set_ (its storage, offset, sizes or strides):
// checked without a reference count or a copy.
struct HeldWeight {
  explicit HeldWeight(at::Tensor t);
  bool unchanged() const;

  at::Tensor tensor;
  const c10::StorageImpl* storage;
  int64_t offset;
  std::vector<int64_t> sizes, strides;
  uint32_t version;
};

// The packing of an op's weights: made by pack on the first call with these weights and reused
// by later calls with the same weights, unchanged, so the ops called with plain weights (as
// exported, compiled and AOTInductor graphs call them) pack once, not on every call. A weight is
// the same while its storage lives, at the same offset, sizes, strides and dtype, with the same
// version counter (every in-place change bumps it; a change through .data does not: call
// clear_packing_cache() after one); a weight of at most 1 KB is the same while its sizes, dtype
// and values are. Inference tensors have no version counter: they are packed on every call.
// scalars: the op's other arguments that the packing depends on. A lookup compares only the
// packings filed under the op and the weights' first weight over 1 KB (its storage and offset),
// so its cost does not grow with the number of packings held. Holds at most
// kPackingCacheBytes of packed weights and kPackingCacheEntries packings, the least recently used
// dropped first, and none for freed weights.
Packed cached_packing(const char* op, at::TensorList weights, std::vector<double> scalars,
                      c10::function_ref<Packed()> pack);
void clear_packing_cache();
// How many times clear_packing_cache() has run: a packing held outside the cache (a Program's) is
// made again once it has.
uint64_t packing_cache_clears();
constexpr size_t kPackingCacheBytes = size_t{1} << 30;
constexpr size_t kPackingCacheEntries = 1024;

// Each op's packing through cached_packing (so the op X_pack and the op X share one packing of a
// set of weights), one per instruction-set level (defined beside the op's kernel, in the level's
// namespace, see cpu/isa.h; registered by packed_weights.cpp, where the class is, so that its
// type is known first, with the level chosen at load).
#define EFFICIENTVIT_DECLARE_PACKINGS                                                          \
  Packed cga_cached_pack_cpu(const at::Tensor& qkv_weight, const at::Tensor& qkv_bias,         \
                             const at::Tensor& dw_weight, const at::Tensor& dw_bias,           \
                             const at::Tensor& attention_bias, const at::Tensor& proj_weight,  \
                             const at::Tensor& proj_bias, int64_t window_size, double scale);  \
  Packed ffn_cached_pack_cpu(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, \
                             const at::Tensor& b2);                                            \
  Packed conv1x1_cached_pack_cpu(const at::Tensor& weight, const at::Tensor& bias,             \
                                 const std::optional<at::Tensor>& dw_weight,                   \
                                 const std::optional<at::Tensor>& dw_bias);                    \
  Packed patch_embed_cached_pack_cpu(at::TensorList weights, at::TensorList biases);
namespace baseline {
EFFICIENTVIT_DECLARE_PACKINGS
}
#if EFFICIENTVIT_MULTI_ISA
namespace avx2 {
EFFICIENTVIT_DECLARE_PACKINGS
}
namespace avx512 {
EFFICIENTVIT_DECLARE_PACKINGS
}
#endif
#undef EFFICIENTVIT_DECLARE_PACKINGS

}  // namespace efficientvit::cpu
