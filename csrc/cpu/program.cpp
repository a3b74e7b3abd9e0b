// Program (see program.h): built step by step from Python, then run as one C++ call.
#include "cpu/program.h"

#include <ATen/ScalarOps.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <deque>
#include <memory>
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

namespace {

// An untyped list argument (as a plan's reader makes them) as the type its schema gives it: the
// boxed kernels take an int[] or a Tensor[] only as a list typed so. Typed lists (Python's)
// pass as they are.
c10::IValue as_schema_list(c10::IValue value, const c10::TypePtr& schema_type) {
  c10::TypePtr type = schema_type;
  if (const auto optional = type->cast<c10::OptionalType>()) type = optional->getElementType();
  const auto list_type = type->cast<c10::ListType>();
  if (!value.isList() || !list_type) return value;
  c10::List<c10::IValue> list = value.toList();
  if (list.elementType()->kind() != c10::TypeKind::AnyType) return value;
  c10::TypePtr element = list_type->getElementType();
  if (element->kind() == c10::TypeKind::SymIntType) element = c10::IntType::get();
  for (const c10::IValue& item : list.vec())
    TORCH_CHECK_VALUE(item.type()->isSubtypeOf(*element) ||
                          (item.isTensor() && element->kind() == c10::TypeKind::TensorType),
                      "efficientvit: a ", item.type()->str(), " in a ", schema_type->str());
  list.unsafeSetElementType(element);
  return list;
}

std::vector<c10::IValue> as_schema_types(std::vector<c10::IValue> arguments,
                                         const c10::FunctionSchema& schema) {
  for (size_t i = 0; i < arguments.size() && i < schema.arguments().size(); ++i)
    arguments[i] = as_schema_list(std::move(arguments[i]), schema.arguments()[i].type());
  return arguments;
}

}  // namespace

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
    if (lists[i].empty()) arguments[i] = as_schema_list(std::move(arguments[i]),
                                                        schema.arguments()[i].type());
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

int64_t Program::add_packing(const std::string& packing,
                             std::vector<c10::IValue> packing_arguments, int64_t input,
                             bool flag) {
  const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow(packing.c_str(), "");
  torch::jit::Stack stack = as_schema_types(std::move(packing_arguments), op.schema());
  op.callBoxed(stack);
  Step step;
  step.packed = stack.at(0).toCustomClass<PackedWeights>();
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

namespace {

void check_plan_tensor(const at::Tensor& plan) {
  TORCH_CHECK_VALUE(plan.device().is_cpu() && plan.scalar_type() == at::kByte &&
                        plan.dim() == 1 && plan.is_contiguous() && plan.numel() >= kPlanHeader,
                    "efficientvit_cpu.program: the plan is a contiguous 1-d uint8 CPU tensor "
                    "written by efficientvit_kernels.export_cpu");
}

// Reads the values of a plan's token stream (program.h). Every count and index is checked
// against the plan's size: a plan is a buffer of a loaded file.
class PlanReader {
 public:
  explicit PlanReader(const at::Tensor& plan) {
    check_plan_tensor(plan);
    bytes_ = static_cast<const uint8_t*>(plan.const_data_ptr());
    size_ = static_cast<size_t>(plan.numel());
    const std::array<int64_t, kPlanHeader / 8> header = header_of(plan);
    TORCH_CHECK_VALUE(header[0] == kPlanMagic, "efficientvit_cpu.program: not a plan");
    const int64_t tokens = header[1], data_at = header[2], data_bytes = header[3];
    TORCH_CHECK_VALUE(tokens >= 0 && tokens <= (int64_t(size_) - kPlanHeader) / 8 &&
                          data_at >= kPlanHeader + tokens * 8 && data_bytes >= 0 &&
                          data_at <= int64_t(size_) && data_bytes <= int64_t(size_) - data_at,
                      "efficientvit_cpu.program: the plan's header does not fit its ", size_,
                      " bytes");
    tokens_left_ = static_cast<size_t>(tokens);
    next_token_ = bytes_ + kPlanHeader;
    data_ = bytes_ + data_at;
    data_bytes_ = static_cast<size_t>(data_bytes);
  }

  // The counts, then the digest.
  static std::array<int64_t, kPlanHeader / 8> header_of(const at::Tensor& plan) {
    std::array<int64_t, kPlanHeader / 8> header;
    std::memcpy(header.data(), plan.const_data_ptr(), sizeof(header));
    return header;
  }


  // The tensor table, then the value that follows it.
  c10::IValue read() {
    const c10::IValue table = value();
    for (const c10::IValue& entry : table.toListRef()) tensors_.push_back(tensor(entry));
    c10::IValue contents = value();
    TORCH_CHECK_VALUE(tokens_left_ == 0, "efficientvit_cpu.program: ", tokens_left_,
                      " tokens left after the plan's calls");
    return contents;
  }

 private:
  enum Token : int64_t { kNone, kBool, kInt, kFloat, kString, kList, kTuple, kTensor };

  int64_t next() {
    TORCH_CHECK_VALUE(tokens_left_ > 0, "efficientvit_cpu.program: the plan ends early");
    int64_t token;
    std::memcpy(&token, next_token_, sizeof(token));
    next_token_ += sizeof(token);
    --tokens_left_;
    return token;
  }

  int64_t count() {
    const int64_t n = next();
    TORCH_CHECK_VALUE(n >= 0 && static_cast<size_t>(n) <= tokens_left_,
                      "efficientvit_cpu.program: a count of ", n, " in a plan");
    return n;
  }

  c10::IValue value() {
    const int64_t token = next();
    switch (token) {
      case kNone:
        return {};
      case kBool:
        return next() != 0;
      case kInt:
        return next();
      case kFloat: {
        const int64_t bits = next();
        double v;
        std::memcpy(&v, &bits, sizeof(v));
        return v;
      }
      case kString: {
        std::string s(static_cast<size_t>(count()), '\0');
        for (char& c : s) c = static_cast<char>(next());
        return s;
      }
      case kList: {
        c10::impl::GenericList list(c10::AnyType::get());
        for (int64_t n = count(); n > 0; --n) list.push_back(value());
        return list;
      }
      case kTuple: {
        std::vector<c10::IValue> items;
        for (int64_t n = count(); n > 0; --n) items.push_back(value());
        return c10::ivalue::Tuple::create(std::move(items));
      }
      case kTensor: {
        const int64_t i = next();
        TORCH_CHECK_VALUE(i >= 0 && i < static_cast<int64_t>(tensors_.size()),
                          "efficientvit_cpu.program: no tensor ", i, " in the plan");
        return tensors_[i];
      }
      default:
        TORCH_CHECK_VALUE(false, "efficientvit_cpu.program: token ", token, " in a plan");
    }
  }

  // A table entry (dtype, sizes, offset): a copy of its bytes, which the program may outlive.
  at::Tensor tensor(const c10::IValue& entry) const {
    const auto& items = entry.toTupleRef().elements();
    TORCH_CHECK_VALUE(items.size() == 3, "efficientvit_cpu.program: a tensor entry of ",
                      items.size(), " items");
    const auto dtype = static_cast<at::ScalarType>(items[0].toInt());
    TORCH_CHECK_VALUE(items[0].toInt() >= 0 &&
                          items[0].toInt() < static_cast<int64_t>(at::ScalarType::NumOptions),
                      "efficientvit_cpu.program: dtype ", items[0].toInt(), " in a plan");
    std::vector<int64_t> sizes;
    int64_t numel = 1;
    for (const c10::IValue& size : items[1].toListRef()) {
      sizes.push_back(size.toInt());
      TORCH_CHECK_VALUE(sizes.back() >= 0, "efficientvit_cpu.program: a size of ", sizes.back());
      numel *= sizes.back();
    }
    const int64_t offset = items[2].toInt();
    const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
    TORCH_CHECK_VALUE(offset >= 0 && nbytes >= 0 &&
                          offset <= static_cast<int64_t>(data_bytes_) &&
                          nbytes <= static_cast<int64_t>(data_bytes_) - offset,
                      "efficientvit_cpu.program: a tensor of ", nbytes, " bytes at ", offset,
                      " in ", data_bytes_, " bytes of data");
    at::Tensor t = at::empty(sizes, at::TensorOptions().dtype(dtype));
    if (nbytes > 0) std::memcpy(t.mutable_data_ptr(), data_ + offset, nbytes);
    return t;
  }

  const uint8_t* bytes_ = nullptr;
  size_t size_ = 0;
  const uint8_t* next_token_ = nullptr;
  size_t tokens_left_ = 0;
  const uint8_t* data_ = nullptr;
  size_t data_bytes_ = 0;
  std::vector<at::Tensor> tensors_;
};

std::vector<int64_t> int_vector(const c10::IValue& list) {
  std::vector<int64_t> out;
  for (const c10::IValue& v : list.toListRef()) out.push_back(v.toInt());
  return out;
}

std::vector<std::vector<int64_t>> int_vectors(const c10::IValue& lists) {
  std::vector<std::vector<int64_t>> out;
  for (const c10::IValue& list : lists.toListRef()) out.push_back(int_vector(list));
  return out;
}

std::vector<c10::IValue> value_vector(const c10::IValue& list) {
  const c10::ArrayRef<c10::IValue> items = list.toListRef();
  return std::vector<c10::IValue>(items.begin(), items.end());
}

}  // namespace

std::pair<c10::intrusive_ptr<Program>, c10::IValue> Program::from_plan(const at::Tensor& plan) {
  const c10::IValue signature_and_calls = PlanReader(plan).read();
  const c10::ArrayRef<c10::IValue> both = signature_and_calls.toListRef();
  TORCH_CHECK_VALUE(both.size() == 2,
                    "efficientvit_cpu.program: a plan holds a signature and calls");
  auto program = c10::make_intrusive<Program>();
  for (const c10::IValue& call : both[1].toListRef()) {
    const auto& items = call.toTupleRef().elements();
    TORCH_CHECK_VALUE(items.size() == 2, "efficientvit: a program call is (method, arguments)");
    const std::string& method = items[0].toStringRef();
    const c10::ArrayRef<c10::IValue> a = items[1].toListRef();
    const auto takes = [&](size_t n) {
      TORCH_CHECK_VALUE(a.size() == n, "efficientvit: Program.", method, " takes ", n,
                        " arguments, got ", a.size());
    };
    if (method == "add_op") {
      takes(5);
      program->add_op(a[0].toStringRef(), a[1].toStringRef(), value_vector(a[2]),
                      int_vector(a[3]), int_vectors(a[4]));
    } else if (method == "add_packing") {
      takes(4);
      program->add_packing(a[0].toStringRef(), value_vector(a[1]), a[2].toInt(), a[3].toBool());
    } else if (method == "add_item") {
      takes(2);
      program->add_item(a[0].toInt(), a[1].toInt());
    } else if (method == "finish") {
      takes(2);
      program->finish(int_vectors(a[0]), a[1].toInt());
    } else {
      TORCH_CHECK_VALUE(false, "efficientvit: a program has no method ", method);
    }
  }
  TORCH_CHECK_VALUE(program->output_ >= 0, "efficientvit: the program's calls do not finish it");
  return {program, both[0]};
}

namespace {

// A tensor's sizes and dtype, as a plan's signature names the input's and the output's.
struct TensorSpec {
  std::vector<int64_t> sizes;
  at::ScalarType dtype;

  explicit TensorSpec(const c10::IValue& spec) {
    const auto& items = spec.toTupleRef().elements();
    TORCH_CHECK_VALUE(items.size() == 2, "efficientvit_cpu.program: a signature of ",
                      items.size(), " items");
    sizes = int_vector(items[0]);
    dtype = static_cast<at::ScalarType>(items[1].toInt());
  }

  bool matches(at::IntArrayRef other_sizes, at::ScalarType other_dtype) const {
    return other_sizes == at::IntArrayRef(sizes) && other_dtype == dtype;
  }
};

// A program built from a plan, under the plan's size and header, which holds the digest of its
// content: a plan is written once and never changed, so two plan tensors with one header (a
// program loaded twice, or its buffer passed as a copy) build the same program. Dropped at the
// first call after clear_packing_cache(), as the packings it holds.
struct BuiltProgram {
  int64_t plan_bytes = 0;
  std::array<int64_t, kPlanHeader / 8> header;
  uint64_t clears = 0;
  c10::intrusive_ptr<Program> program;
  TensorSpec input, output;
};

// Few plans are in use at once (one per exported model); the oldest built goes first.
constexpr size_t kBuiltPrograms = 8;

std::shared_ptr<const BuiltProgram> program_of(const at::Tensor& plan) {
  static std::mutex mutex;
  static std::deque<std::shared_ptr<const BuiltProgram>> built;
  check_plan_tensor(plan);
  const std::array<int64_t, kPlanHeader / 8> header = PlanReader::header_of(plan);
  std::lock_guard<std::mutex> lock(mutex);
  const uint64_t clears = packing_cache_clears();
  built.erase(std::remove_if(built.begin(), built.end(),
                             [&](const auto& b) { return b->clears != clears; }),
              built.end());
  for (const auto& b : built)
    if (b->plan_bytes == plan.numel() && b->header == header) return b;
  // Packing reads only the plan, so it is built under the lock (once per plan).
  auto [program, signature] = Program::from_plan(plan);
  const c10::ArrayRef<c10::IValue> specs = signature.toListRef();
  TORCH_CHECK_VALUE(specs.size() == 2, "efficientvit_cpu.program: a signature of ", specs.size(),
                    " tensors");
  if (built.size() == kBuiltPrograms) built.pop_front();
  built.push_back(std::make_shared<const BuiltProgram>(BuiltProgram{
      plan.numel(), header, clears, program, TensorSpec(specs[0]), TensorSpec(specs[1])}));
  return built.back();
}

}  // namespace

at::Tensor run_program(const at::Tensor& x, const at::Tensor& plan, at::IntArrayRef input_size,
                       at::ScalarType input_dtype, at::IntArrayRef output_size,
                       at::ScalarType output_dtype) {
  const std::shared_ptr<const BuiltProgram> built = program_of(plan);
  TORCH_CHECK_VALUE(built->input.matches(input_size, input_dtype) &&
                        built->output.matches(output_size, output_dtype),
                    "efficientvit_cpu.program: its plan takes ", built->input.sizes, " ",
                    built->input.dtype, " and returns ", built->output.sizes, " ",
                    built->output.dtype, ", not ", input_size, " ", input_dtype, " and ",
                    output_size, " ", output_dtype);
  TORCH_CHECK_VALUE(x.device().is_cpu() && built->input.matches(x.sizes(), x.scalar_type()),
                    "efficientvit_cpu.program: the program was captured for ", input_size, " ",
                    input_dtype, " on cpu, got ", x.sizes(), " ", x.scalar_type(), " on ",
                    x.device());
  at::Tensor out = built->program->run(x);
  TORCH_CHECK(built->output.matches(out.sizes(), out.scalar_type()),
              "efficientvit_cpu.program: the program computed ", out.sizes(), " ",
              out.scalar_type(), ", its plan promises ", output_size, " ", output_dtype);
  return out.contiguous();
}

}  // namespace efficientvit::cpu
