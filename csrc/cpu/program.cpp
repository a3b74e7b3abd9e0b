// Program (see program.h): built step by step from Python, then run as one C++ call.
#include "cpu/program.h"

#include <ATen/ScalarOps.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>

namespace efficientvit::cpu {

int64_t Program::add_step(Step step) {
  TORCH_CHECK(output_ < 0, "efficientvit: a finished program takes no more steps");
  const auto check_slot = [&](int64_t slot) {
    TORCH_CHECK_VALUE(slot < slot_count_, "efficientvit: a step reads slot ", slot,
                      ", which no earlier step writes");
  };
  for (const int64_t slot : step.slots) check_slot(slot);
  for (const auto& list : step.lists)
    for (const int64_t slot : list) check_slot(slot);
  step.first_output = slot_count_;
  slot_count_ += step.outputs;
  steps_.push_back(std::move(step));
  return steps_.back().first_output;
}

int64_t Program::add_op(const std::string& name, const std::string& overload,
                        std::vector<c10::IValue> arguments, std::vector<int64_t> slots,
                        std::vector<std::vector<int64_t>> lists) {
  const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(
      name.c_str(), overload.c_str());
  const c10::FunctionSchema& schema = op.schema();
  const size_t n = schema.arguments().size();
  TORCH_CHECK_VALUE(arguments.size() == n && slots.size() == n && lists.size() == n,
                    "efficientvit: ", schema.name(), " takes ", n, " arguments, got ",
                    arguments.size(), " values, ", slots.size(), " slots and ", lists.size(),
                    " lists");
  Step step;
  for (size_t i = 0; i < n; ++i) {
    // A number where the schema has a Tensor (x * 0.25 as aten::mul.Tensor): the 0-d "wrapped
    // number" tensor Python's argument parser makes of it, which type promotion treats as a
    // Python number.
    if (slots[i] < 0 && arguments[i].isScalar() &&
        schema.arguments()[i].type()->kind() == c10::TypeKind::TensorType) {
      at::Tensor number = c10::scalar_to_tensor(arguments[i].toScalar());
      number.unsafeGetTensorImpl()->set_wrapped_number(true);
      arguments[i] = number;
    }
    if (lists[i].empty()) continue;
    const c10::TypePtr& type = schema.arguments()[i].type();
    const bool tensors = type->isSubtypeOf(*c10::ListType::ofTensors());
    const bool optional_tensors = type->isSubtypeOf(*c10::ListType::ofOptionalTensors());
    TORCH_CHECK_VALUE(tensors || optional_tensors, "efficientvit: argument ",
                      schema.arguments()[i].name(), " of ", schema.name(), " is a ", type->str(),
                      ", not a list of tensors");
    for (size_t j = 0; j < lists[i].size(); ++j)
      TORCH_CHECK_VALUE(lists[i][j] >= 0 || (arguments[i].isList() &&
                                             j < arguments[i].toListRef().size()),
                        "efficientvit: element ", j, " of argument ",
                        schema.arguments()[i].name(), " has no value");
    step.optional_elements.resize(n);
    step.optional_elements[i] = optional_tensors;
  }
  step.op = op;
  step.outputs = static_cast<int64_t>(schema.returns().size());
  step.arguments = std::move(arguments);
  step.slots = std::move(slots);
  step.lists = std::move(lists);
  return add_step(std::move(step));
}

c10::IValue Program::list_argument(const Step& step, size_t i,
                                   const std::vector<c10::IValue>& values) const {
  const std::vector<int64_t>& slots = step.lists[i];
  const auto element = [&](size_t j) -> const c10::IValue& {
    return slots[j] >= 0 ? values[slots[j]] : step.arguments[i].toListRef()[j];
  };
  if (step.optional_elements[i]) {
    c10::List<std::optional<at::Tensor>> list;
    for (size_t j = 0; j < slots.size(); ++j) list.push_back(element(j).toOptional<at::Tensor>());
    return list;
  }
  c10::List<at::Tensor> list;
  for (size_t j = 0; j < slots.size(); ++j) list.push_back(element(j).toTensor());
  return list;
}

int64_t Program::add_packed(Packed packed, int64_t input, bool flag) {
  Step step;
  step.packed = std::move(packed);
  step.flag = flag;
  step.slots = {input};
  step.outputs = 1;
  return add_step(std::move(step));
}

void Program::pack_last(Packed packed, bool flag, const std::string& packing,
                        std::vector<c10::IValue> packing_arguments) {
  TORCH_CHECK(output_ < 0, "efficientvit: a finished program takes no more steps");
  TORCH_CHECK_VALUE(!steps_.empty() && steps_.back().op && !steps_.back().slots.empty() &&
                        steps_.back().slots[0] >= 0,
                    "efficientvit: pack_last needs an op step on a computed x");
  auto path = std::make_shared<PackedPath>();
  path->packed = std::move(packed);
  path->flag = flag;
  path->packing = c10::Dispatcher::singleton().findSchemaOrThrow(packing.c_str(), "");
  for (const c10::IValue& v : packing_arguments) {
    if (v.isTensor()) path->weights.emplace_back(v.toTensor());
    if (v.isTensorList())
      for (const at::Tensor& t : v.toTensorVector()) path->weights.emplace_back(t);
  }
  path->clears = packing_cache_clears();
  path->arguments = std::move(packing_arguments);
  steps_.back().packed_path = std::move(path);
}

Packed Program::PackedPath::current() {
  std::lock_guard<std::mutex> lock(mutex);
  const uint64_t now = packing_cache_clears();
  if (now != clears || !std::all_of(weights.begin(), weights.end(),
                                    [](const HeldWeight& w) { return w.unchanged(); })) {
    torch::jit::Stack stack(arguments.begin(), arguments.end());
    packing->callBoxed(stack);
    packed = stack.at(0).toCustomClass<PackedWeights>();
    for (HeldWeight& w : weights) w = HeldWeight(w.tensor);
    clears = now;
  }
  return packed;
}

int64_t Program::add_item(int64_t list, int64_t index) {
  TORCH_CHECK_VALUE(index >= 0, "efficientvit: a list has no element ", index);
  Step step;
  step.item = index;
  step.slots = {list};
  step.outputs = 1;
  return add_step(std::move(step));
}

void Program::finish(std::vector<std::vector<int64_t>> drop_after, int64_t output) {
  TORCH_CHECK_VALUE(drop_after.size() == steps_.size(), "efficientvit: ", steps_.size(),
                    " steps, but slots to drop after ", drop_after.size());
  TORCH_CHECK_VALUE(output >= 0 && output < slot_count_, "efficientvit: no slot ", output);
  for (size_t i = 0; i < steps_.size(); ++i) steps_[i].drop = std::move(drop_after[i]);
  output_ = output;
}

at::Tensor Program::run(const at::Tensor& x) const {
  TORCH_CHECK(output_ >= 0, "efficientvit: the program is not finished");
  // The fused ops have no backward, and a captured forward records no graph.
  at::NoGradGuard no_grad;
  std::vector<c10::IValue> values(slot_count_);
  values[0] = x;
  torch::jit::Stack stack;
  for (const Step& step : steps_) {
    if (step.packed_path) {
      values[step.first_output] = step.packed_path->current()->run(
          values[step.slots[0]].toTensor(), step.packed_path->flag);
    } else if (step.packed) {
      values[step.first_output] = step.packed->run(values[step.slots[0]].toTensor(), step.flag);
    } else if (step.item >= 0) {
      const c10::ArrayRef<c10::IValue> list = values[step.slots[0]].toListRef();
      TORCH_CHECK_INDEX(step.item < static_cast<int64_t>(list.size()), "efficientvit: element ",
                        step.item, " of a list of ", list.size());
      values[step.first_output] = list[step.item];
    } else {
      stack.clear();
      for (size_t i = 0; i < step.slots.size(); ++i) {
        if (!step.lists[i].empty()) {
          stack.push_back(list_argument(step, i, values));
        } else {
          stack.push_back(step.slots[i] < 0 ? step.arguments[i] : values[step.slots[i]]);
        }
      }
      step.op->callBoxed(stack);
      for (int64_t j = 0; j < step.outputs; ++j)
        values[step.first_output + j] = std::move(stack[j]);
    }
    for (const int64_t slot : step.drop) values[slot] = c10::IValue();
  }
  return values[output_].toTensor();
}

}  // namespace efficientvit::cpu
