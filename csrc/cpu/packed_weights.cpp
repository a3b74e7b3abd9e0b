// The CPU backend's private library: the PackedWeights class, per op with packed weights its
// packing X_pack (see packed_weights.h), and the Program class (program.h). Not part of the
// public API: the layout and these schemas may change with any build. Registered in this one
// file, in this order: a schema that names PackedWeights (X_pack's, Program.pack_last's) must
// come after it (static initializers of different files run in no set order).
#include "cpu/packed_weights.h"

#include <ATen/ops/from_blob.h>
#include <ATen/record_function.h>
#include <c10/util/hash.h>

#include "cpu/program.h"
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "checks.h"
#include "inference_only.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace efficientvit::cpu {

at::Tensor PackedWeights::run(const at::Tensor& x, bool flag) const {
  RECORD_FUNCTION(name, std::vector<c10::IValue>({x}));
  check_no_grad(name.c_str(), x);
  check_input(x);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "efficientvit: ", op, " on packed weights: x is on ",
                    x.device(), "; packed weights are for the CPU kernels");
  TORCH_CHECK_VALUE(x.scalar_type() == dtype, "efficientvit: x has dtype ", x.scalar_type(),
                    " but the weights were packed for ", dtype);
  TORCH_CHECK_VALUE(x.size(1) == channels, "efficientvit: x has ", x.size(1),
                    " channels but the weights were packed for ", channels);
  return kernel(x, *this, flag);
}

namespace {

constexpr size_t kHugePageBytes = size_t{2} << 20;
constexpr size_t kSlabBytes = size_t{32} << 20;  // M4's 35 MB of weights: two slabs

// Memory for packed weights, freed when the last tensor in it is.
struct Slab {
  explicit Slab(size_t bytes) : bytes(bytes), base(std::aligned_alloc(kHugePageBytes, bytes)) {
    TORCH_CHECK(base, "efficientvit: could not allocate ", bytes, " bytes for packed weights");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(base, bytes, MADV_HUGEPAGE);  // advice: where refused, 4 KiB pages serve
#endif
  }
  ~Slab() { std::free(base); }
  Slab(const Slab&) = delete;
  Slab& operator=(const Slab&) = delete;

  size_t bytes;
  void* base;
};

// The slab being filled, in order: the next packing's tensors follow the last one's.
struct WeightMemory {
  std::mutex mutex;
  std::shared_ptr<Slab> slab;
  size_t used = 0;

  // bytes (a multiple of 64), and the slab that holds them.
  std::pair<char*, std::shared_ptr<Slab>> allocate(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex);
    if (slab && slab.use_count() == 1) used = 0;  // every tensor in it freed
    if (!slab || used + bytes > slab->bytes) {
      slab = std::make_shared<Slab>(
          std::max(kSlabBytes, (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes));
      used = 0;
    }
    char* p = static_cast<char*>(slab->base) + used;
    used += bytes;
    return {p, slab};
  }
};

WeightMemory& weight_memory() {
  static WeightMemory* instance = new WeightMemory();  // never destroyed: used until exit
  return *instance;
}

// bytes rounded up to whole 64-byte cache lines: each tensor starts on a line.
size_t whole_cache_lines(size_t bytes) { return (bytes + 63) / 64 * 64; }

}  // namespace

std::vector<at::Tensor> in_weight_memory(std::vector<at::Tensor> tensors) {
  size_t bytes = 0;
  for (const at::Tensor& t : tensors) bytes += t.defined() ? whole_cache_lines(t.nbytes()) : 0;
  if (bytes == 0) return tensors;
  auto [p, slab] = weight_memory().allocate(bytes);
  for (at::Tensor& t : tensors) {
    if (!t.defined()) continue;
    const at::Tensor dense = t.contiguous();
    std::memcpy(p, dense.data_ptr(), dense.nbytes());
    t = at::from_blob(p, dense.sizes(), [slab = slab](void*) {},
                      at::TensorOptions().dtype(dense.scalar_type()));
    p += whole_cache_lines(dense.nbytes());
  }
  return tensors;
}

namespace {

// A weight as the cache identifies it (see cached_packing): by its storage, or, if small, by its
// value. (A graph compiler may rebuild a small constant on every call, into new memory: an
// AOTInductor package rebuilds the stem's 8-value bias.)
constexpr int64_t kByValueBytes = 1024;

struct WeightId {
  explicit WeightId(const at::Tensor& t)
      : address(t.storage().unsafeGetStorageImpl()), offset(t.storage_offset()),
        sizes(t.sizes().vec()), strides(t.strides().vec()), dtype(t.scalar_type()),
        storage(t.storage().getWeakStorageImpl()) {
    if (t.nbytes() <= kByValueBytes) {
      value = t.contiguous().clone();
    } else {
      version = t._version();
    }
  }

  bool is(const at::Tensor& t) const {
    if (t.scalar_type() != dtype || !t.sizes().equals(sizes)) return false;
    if (value.defined()) {
      const at::Tensor dense = t.contiguous();
      return std::memcmp(dense.data_ptr(), value.data_ptr(), value.nbytes()) == 0;
    }
    return t.storage().unsafeGetStorageImpl() == address && !storage.expired() &&
           t.storage_offset() == offset && t.strides().equals(strides) &&
           t._version() == version;
  }

  bool freed() const { return !value.defined() && storage.expired(); }

  const c10::StorageImpl* address;
  int64_t offset;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;  // expired once freed
  at::Tensor value;                                   // a small weight's copy
  uint32_t version = 0;                               // a larger one's version counter
};

// The bucket a packing is filed under: its op and the storage of its first weight larger than
// kByValueBytes (none if every weight is small), so that a lookup compares the packings of one
// layer, not every packing in the cache.
struct BucketKey {
  std::string op;
  const c10::StorageImpl* address = nullptr;
  int64_t offset = 0;

  BucketKey(const char* op, at::TensorList weights) : op(op) {
    for (const at::Tensor& w : weights) {
      if (w.nbytes() > kByValueBytes) {
        address = w.storage().unsafeGetStorageImpl();
        offset = w.storage_offset();
        break;
      }
    }
  }
  bool operator==(const BucketKey& other) const {
    return address == other.address && offset == other.offset && op == other.op;
  }
};

struct BucketKeyHash {
  size_t operator()(const BucketKey& k) const {
    return c10::get_hash(k.op, reinterpret_cast<uintptr_t>(k.address), k.offset);
  }
};

struct CacheEntry {
  BucketKey bucket;
  std::vector<double> scalars;
  std::vector<WeightId> weights;
  Packed packed;
  size_t bytes;
};

using Entries = std::list<CacheEntry>;  // most recently used first

struct PackingCache {
  std::mutex mutex;
  Entries entries;
  std::unordered_map<BucketKey, std::vector<Entries::iterator>, BucketKeyHash> buckets;
  size_t bytes = 0;

  Entries::iterator erase(Entries::iterator it) {
    auto bucket = buckets.find(it->bucket);
    auto& members = bucket->second;
    members.erase(std::find(members.begin(), members.end(), it));
    if (members.empty()) buckets.erase(bucket);
    bytes -= it->bytes;
    return entries.erase(it);
  }
};

PackingCache& cache() {
  static PackingCache* instance = new PackingCache();  // never destroyed: used until exit
  return *instance;
}

bool matches(const CacheEntry& e, at::TensorList weights, const std::vector<double>& scalars) {
  if (e.scalars != scalars || e.weights.size() != weights.size()) return false;
  for (size_t i = 0; i < weights.size(); ++i) {
    if (!e.weights[i].is(weights[i])) return false;
  }
  return true;
}

bool expired(const CacheEntry& e) {
  return std::any_of(e.weights.begin(), e.weights.end(),
                     [](const WeightId& w) { return w.freed(); });
}

}  // namespace

Packed cached_packing(const char* op, at::TensorList weights, std::vector<double> scalars,
                      c10::function_ref<Packed()> pack) {
  const auto recorded_pack = [&] {
    RECORD_FUNCTION(std::string("efficientvit_cpu::pack (") + op + ")",
                    std::vector<c10::IValue>());
    return pack();
  };
  if (std::any_of(weights.begin(), weights.end(),
                  [](const at::Tensor& w) { return w.is_inference(); })) {
    return recorded_pack();
  }
  PackingCache& c = cache();
  BucketKey key(op, weights);
  std::lock_guard<std::mutex> lock(c.mutex);
  if (auto bucket = c.buckets.find(key); bucket != c.buckets.end()) {
    for (Entries::iterator it : bucket->second) {
      if (matches(*it, weights, scalars)) {
        c.entries.splice(c.entries.begin(), c.entries, it);  // iterators stay valid
        return it->packed;
      }
    }
  }
  Packed packed = recorded_pack();
  size_t bytes = 0;
  for (const at::Tensor& t : packed->tensors) bytes += t.nbytes();
  std::vector<WeightId> ids(weights.begin(), weights.end());
  c.entries.push_front({key, std::move(scalars), std::move(ids), packed, bytes});
  c.buckets[std::move(key)].push_back(c.entries.begin());
  c.bytes += bytes;
  // Drop the entries whose weights were freed, then the least recently used beyond the bound.
  for (auto it = std::next(c.entries.begin()); it != c.entries.end();) {
    it = expired(*it) ? c.erase(it) : std::next(it);
  }
  while ((c.bytes > kPackingCacheBytes || c.entries.size() > kPackingCacheEntries) &&
         c.entries.size() > 1) {
    c.erase(std::prev(c.entries.end()));
  }
  return packed;
}

HeldWeight::HeldWeight(at::Tensor t) : tensor(std::move(t)) {
  const c10::TensorImpl* impl = tensor.unsafeGetTensorImpl();
  storage = impl->unsafe_storage().unsafeGetStorageImpl();
  offset = impl->storage_offset();
  sizes = impl->sizes().vec();
  strides = impl->strides().vec();
  version = impl->version_counter().current_version();
}

bool HeldWeight::unchanged() const {
  const c10::TensorImpl* impl = tensor.unsafeGetTensorImpl();
  return impl->unsafe_storage().unsafeGetStorageImpl() == storage &&
         impl->storage_offset() == offset && impl->sizes().equals(sizes) &&
         impl->strides().equals(strides) && impl->version_counter().current_version() == version;
}

namespace {
std::atomic<uint64_t> cleared_count{0};
}  // namespace

uint64_t packing_cache_clears() { return cleared_count.load(std::memory_order_acquire); }

void clear_packing_cache() {
  PackingCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  cleared_count.fetch_add(1, std::memory_order_acq_rel);
  c.entries.clear();
  c.buckets.clear();
  c.bytes = 0;
}

}  // namespace efficientvit::cpu

#define EFFICIENTVIT_PACKED_WEIGHTS "__torch__.torch.classes.efficientvit_cpu.PackedWeights"

TORCH_LIBRARY(efficientvit_cpu, m) {
  m.class_<efficientvit::cpu::PackedWeights>("PackedWeights")
      .def("run", &efficientvit::cpu::PackedWeights::run);
  m.class_<efficientvit::cpu::Program>("Program")
      .def(torch::init<>())
      .def("add_op", &efficientvit::cpu::Program::add_op)
      .def("add_packing", &efficientvit::cpu::Program::add_packing)
      .def("pack_last", &efficientvit::cpu::Program::pack_last)
      .def("add_item", &efficientvit::cpu::Program::add_item)
      .def("finish", &efficientvit::cpu::Program::finish)
      .def("run", &efficientvit::cpu::Program::run);
  m.def(
      "cga_pack(Tensor qkv_weight, Tensor qkv_bias, Tensor dw_weight, Tensor dw_bias, "
      "Tensor attention_bias, Tensor proj_weight, Tensor proj_bias, int window_size, "
      "float scale) -> " EFFICIENTVIT_PACKED_WEIGHTS);
  m.def("ffn_pack(Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> " EFFICIENTVIT_PACKED_WEIGHTS);
  m.def(
      "conv1x1_pack(Tensor weight, Tensor bias, Tensor? dw_weight=None, Tensor? dw_bias=None) -> "
      EFFICIENTVIT_PACKED_WEIGHTS);
  m.def("patch_embed_pack(Tensor[] weights, Tensor[] biases) -> " EFFICIENTVIT_PACKED_WEIGHTS);
  m.def("clear_packing_cache() -> ()", &efficientvit::cpu::clear_packing_cache);
  m.def(
      "program(Tensor x, Tensor plan, int[] input_size, ScalarType input_dtype, "
      "int[] output_size, ScalarType output_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(efficientvit_cpu, CPU, m) {
  m.impl("cga_pack", EFFICIENTVIT_SELECT_ISA(cga_cached_pack_cpu));
  m.impl("ffn_pack", EFFICIENTVIT_SELECT_ISA(ffn_cached_pack_cpu));
  m.impl("conv1x1_pack", EFFICIENTVIT_SELECT_ISA(conv1x1_cached_pack_cpu));
  m.impl("patch_embed_pack", EFFICIENTVIT_SELECT_ISA(patch_embed_cached_pack_cpu));
  m.impl("program", &efficientvit::cpu::run_program);
}
