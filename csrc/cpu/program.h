// A model's forward captured once and replayed in C++ (efficientvit_kernels.cpu_graph): the
// steps of an exported graph, each an operator called through the dispatcher or a fused op's
// kernel on weights packed at capture, with no Python between them. At batch 1 the Python
// around ~60 op calls costs about as much as the smallest stages' kernels.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "cpu/packed_weights.h"

namespace efficientvit::cpu {

struct Program : torch::CustomClassHolder {
  // The values a run computes live in slots: slot 0 is the input, each step writes its outputs
  // to the next free slots. Every add_* returns the first slot its step writes.

  // An operator ("aten::linear", overload "" for the default), called with every argument of
  // its schema, in order: arguments[i] where slots[i] < 0, else the value of slot slots[i]; or,
  // where lists[i] is not empty, a list of tensors (Tensor[] or Tensor?[]) whose element j is
  // the value of slot lists[i][j], or where that is negative, element j of arguments[i].
  int64_t add_op(const std::string& name, const std::string& overload,
                 std::vector<c10::IValue> arguments, std::vector<int64_t> slots,
                 std::vector<std::vector<int64_t>> lists);
  // A fused op's kernel on the value of slot `input` (PackedWeights::run), on the weights the
  // packing op `packing` ("efficientvit_cpu::ffn_pack") packs now from `packing_arguments`.
  int64_t add_packing(const std::string& packing, std::vector<c10::IValue> packing_arguments,
                      int64_t input, bool flag);
  // The last step added, a fused op's call on the value of its first argument x, runs as the
  // kernel of `packed` on x while the weights it was packed from (the tensors among
  // `packing_arguments`, which the program holds) are unchanged (HeldWeight) and the packing
  // cache has not been cleared: no argument checks, no packing-cache lookup. Otherwise the
  // packing op `packing` ("efficientvit_cpu::ffn_pack") is called on `packing_arguments` again,
  // and its result runs.
  void pack_last(Packed packed, bool flag, const std::string& packing,
                 std::vector<c10::IValue> packing_arguments);
  // Element `index` of the list in slot `list` (an operator's Tensor[] output).
  int64_t add_item(int64_t list, int64_t index);
  // The slots no step after `step` reads: dropped after it, so that memory is reused while
  // still in cache. The output is the value of slot `output`, which must hold a tensor.
  void finish(std::vector<std::vector<int64_t>> drop_after, int64_t output);

  at::Tensor run(const at::Tensor& x) const;

  // The program a plan builds (efficientvit_kernels.export_cpu writes it; plan.py). A plan is a
  // 1-d uint8 tensor:
  //   bytes 0-31:  int64 kPlanMagic, token count T, data offset D, data size (all little-endian)
  //   bytes 32-63: the SHA-256 of bytes 64 on (the plan's name in the cache of built programs)
  //   bytes 64-:   T int64 tokens: two values, the tensor table and [signature, calls]
  //   bytes D-:    the tensors' data, contiguous, each at a multiple of 64 bytes from D.
  // A value is None (0), bool (1, v), int (2, v), float (3, its IEEE bits), string (4, n, one
  // token per byte), list (5, n, n values), tuple (6, n, n values) or tensor (7, table index).
  // The table is a list of (ScalarType, sizes list, offset from D) tuples; the signature a list
  // of two (sizes list, ScalarType) tuples, the input's and the output's; the calls a list of
  // (method name, arguments list) tuples, each a call of add_op, add_packing, add_item or
  // finish, in order. Returns the program and its signature.
  static std::pair<c10::intrusive_ptr<Program>, c10::IValue> from_plan(const at::Tensor& plan);

 private:
  // A packed kernel standing in for an op step while its weights are unchanged.
  struct PackedPath {
    Packed packed;
    bool flag = false;
    std::optional<c10::OperatorHandle> packing;
    std::vector<c10::IValue> arguments;  // packing's
    std::vector<HeldWeight> weights;     // the tensors among them, as they were when packed
    uint64_t clears = 0;                 // packing_cache_clears() when packed
    std::mutex mutex;                    // runs on several threads may find a weight changed

    // The packing of the weights as they are now.
    Packed current();
  };

  struct Step {
    std::shared_ptr<PackedPath> packed_path;  // run while its weights are unchanged, or else
    std::optional<c10::OperatorHandle> op;  // called boxed, or else
    Packed packed;                          // run on slots[0], or else
    int64_t item = -1;                      // this element of the list in slots[0]
    bool flag = false;
    std::vector<c10::IValue> arguments;
    std::vector<int64_t> slots;
    std::vector<std::vector<int64_t>> lists;
    std::vector<bool> optional_elements;  // per list argument: Tensor?[] rather than Tensor[]
    int64_t first_output = 0, outputs = 0;
    std::vector<int64_t> drop;
  };
  int64_t add_step(Step step);
  c10::IValue list_argument(const Step& step, size_t i,
                            const std::vector<c10::IValue>& values) const;

  std::vector<Step> steps_;
  int64_t slot_count_ = 1;
  int64_t output_ = -1;
};

constexpr int64_t kPlanMagic = 0x314E414C50545645;  // "EVTPLAN1"
constexpr int64_t kPlanHeader = 64;

// efficientvit_cpu::program: x through the program `plan` builds (Program::from_plan), built on
// its first call and kept. The sizes and dtypes passed must be the plan's own (the op's fake
// reads them, not the plan). x must have the size and dtype the program
// was captured for; the output is contiguous, of output_size and output_dtype.
at::Tensor run_program(const at::Tensor& x, const at::Tensor& plan, at::IntArrayRef input_size,
                       at::ScalarType input_dtype, at::IntArrayRef output_size,
                       at::ScalarType output_dtype);

}  // namespace efficientvit::cpu
