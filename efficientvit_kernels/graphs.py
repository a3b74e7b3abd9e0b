"""Replays of a (fused) model for batch-1 latency, where the cost around each op dominates:
``cuda_graph`` (a CUDA graph: no launch per op), ``cpu_graph`` (one C++ program: no Python
between the ops), ``cpu_replay`` (a model's own calls replayed as such programs, captured
as it runs and checked against the model on every call; ``convert`` turns it on) and
``export_cpu`` (such a program as the one op of an exported graph, to save or compile)."""
import itertools
import operator
import threading
import warnings
import weakref

import torch

from . import _C, ops  # noqa: F401  (ops loads the library that defines efficientvit_cpu.Program)
from .modules import _Fused
from .plan import encode as encode_plan

__all__ = ["cuda_graph", "cpu_graph", "cpu_replay", "export_cpu"]


def _check_like(x, example, what):
    if (not isinstance(x, torch.Tensor) or x.shape != example.shape or x.dtype != example.dtype
            or x.device != example.device):
        got = (f"{tuple(x.shape)} {x.dtype} on {x.device}" if isinstance(x, torch.Tensor)
               else type(x).__name__)
        raise ValueError(f"{what} was captured for {tuple(example.shape)} {example.dtype} on "
                         f"{example.device}, got {got}")


@torch.no_grad()
def cuda_graph(module, example, warmup=3):
    """Captures ``module(example)`` in a CUDA graph; returns ``run(x)`` that replays it.

    ``x`` must have ``example``'s shape, dtype and device. The result is a tensor owned by the
    graph, overwritten by the next call: clone it to keep it. The fused ops launch on the
    current stream without host syncs, so they capture.
    """
    if not example.is_cuda:
        raise ValueError("cuda_graph needs a CUDA tensor")
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph (lazy init, autotuning)
        for _ in range(warmup):
            module(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = module(static_in)

    def run(x):
        _check_like(x, static_in, "cuda_graph")
        static_in.copy_(x)
        graph.replay()
        return static_out

    return run


# The CPU ops with a packing (efficientvit_cpu.X_pack): the argument PackedWeights.run takes as
# its flag; the packing takes every other argument but x, in the op's order.
_PACKED_FLAG = {"cga": "residual", "ffn": "residual", "conv1x1": "relu", "patch_embed": "final_relu"}


class _Capture:
    """Translates an exported program's graph into an efficientvit_cpu.Program.

    ``live``: None, or the module that was exported. Without it the program holds copies of the
    weights and the fused ops' packings, taken now; with it, the module's own parameters and
    buffers (so later changes to their values are seen) and the fused ops as op steps that run
    the op's cached packing while the weights it was packed from are unchanged, and pack again
    once one has changed (Program.pack_last). ``program``: what to build (a Program, or a
    _RecordedProgram), else a new Program."""

    def __init__(self, exported, live=None, program=None):
        self.live = live
        self.program = program or torch.classes.efficientvit_cpu.Program()
        self.slots = {}      # fx node -> the slot of its value (a tuple's first element)
        self.constants = {}  # fx placeholder -> its tensor (copied at capture unless live)
        self.reads = []      # per step, the slots it reads
        self.list_outputs = set()  # the fx nodes whose slot holds a list (a Tensor[] output)
        signature = exported.graph_signature
        if signature.buffers_to_mutate or signature.user_inputs_to_mutate:
            raise NotImplementedError("cpu_graph: the model writes to its buffers or input")
        tensors = {**exported.constants, **exported.state_dict}
        by_name = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
                   **signature.inputs_to_lifted_tensor_constants}
        for node in exported.graph.nodes:
            if node.op == "placeholder" and node.name in by_name:
                self.constants[node] = self.tensor(by_name[node.name], tensors)
            elif node.op == "placeholder":
                if self.slots:
                    raise NotImplementedError("cpu_graph: the model takes more than one input")
                self.slots[node] = 0
            elif node.op == "call_function":
                self.add(node)
            elif node.op == "output":
                self.finish(node)
            else:
                raise NotImplementedError(f"cpu_graph: no step for graph node {node.format_node()}")

    def tensor(self, target, tensors):
        """The tensor a parameter, buffer or constant placeholder stands for."""
        if self.live is None:
            return tensors[target].detach().clone()
        for get in (self.live.get_parameter, self.live.get_buffer):
            try:
                return get(target)
            except AttributeError:
                pass
        return tensors[target]  # a constant the forward made: the same on every call

    def value(self, v):
        """What an argument v stands for: (a constant, or None; the slot it reads, or -1; for a
        list holding computed values, the slot of each element, -1 for a constant one)."""
        if isinstance(v, torch.fx.Node):
            if v in self.constants:
                return self.constants[v], -1, []
            return None, self.slots[v], []
        if isinstance(v, (list, tuple)):
            items = [self.value(item) for item in v]
            if any(list_slots for _, _, list_slots in items):
                raise NotImplementedError("cpu_graph: a list of lists of computed values")
            constants = [c for c, _, _ in items]
            slots = [slot for _, slot, _ in items]
            return constants, -1, slots if any(s >= 0 for s in slots) else []
        return v, -1, []

    def arguments(self, node):
        """Every argument of the node's operator, in its schema's order: {name: value(...)}."""
        out = {}
        for i, arg in enumerate(node.target._schema.arguments):
            if i < len(node.args) and not arg.kwarg_only:
                v = node.args[i]
            elif arg.name in node.kwargs:
                v = node.kwargs[arg.name]
            elif arg.has_default_value():
                v = arg.default_value
            else:
                raise NotImplementedError(f"cpu_graph: no value for {arg.name} in {node.format_node()}")
            out[arg.name] = self.value(v)
        return out

    def add(self, node):
        if node.target is operator.getitem:
            base, index = node.args
            if base in self.list_outputs:  # an element of a Tensor[] output: a step takes it
                self.slots[node] = self.program.add_item(self.slots[base], index)
                self.reads.append([self.slots[base]])
            else:  # an output of a step with several: its own slot
                self.slots[node] = self.slots[base] + index
            return
        if not isinstance(node.target, torch._ops.OpOverload):
            raise NotImplementedError(f"cpu_graph: no step for {node.format_node()}")
        args = self.arguments(node)
        for arg in node.target._schema.arguments:  # the graph may keep in-place ops on buffers
            writes = arg.alias_info is not None and arg.alias_info.is_write
            if writes and args[arg.name][1] < 0 and not args[arg.name][2]:
                raise NotImplementedError(f"cpu_graph: the model writes to its buffers or "
                                          f"parameters ({node.format_node()})")
        namespace, op = node.target._schema.name.split("::")
        constants, slots, lists = zip(*args.values())
        reads = [s for s in slots if s >= 0] + [s for list_slots in lists for s in list_slots if s >= 0]
        flag = _PACKED_FLAG.get(op) if namespace == "efficientvit" else None
        packable = flag is not None and reads == [args["x"][1]] and not any(lists)
        if packable:
            packing_op = f"efficientvit_cpu::{op}_pack"
            packing = [c for name, (c, _, _) in args.items() if name not in ("x", flag)]
        if packable and self.live is None:
            self.slots[node] = self.program.add_packing(packing_op, packing, args["x"][1],
                                                        args[flag][0])
        else:
            self.slots[node] = self.program.add_op(
                node.target._schema.name, node.target._schema.overload_name,
                list(constants), list(slots), list(lists))
            if packable:  # the op's packing, used while the live weights are unchanged
                packed = getattr(torch.ops.efficientvit_cpu, f"{op}_pack")(*packing)
                self.program.pack_last(packed, args[flag][0], packing_op, packing)
        self.reads.append(reads)
        returns = node.target._schema.returns
        if len(returns) == 1 and isinstance(returns[0].type, torch.ListType):
            self.list_outputs.add(node)

    def finish(self, node):
        (result,) = node.args
        if not (isinstance(result, (list, tuple)) and len(result) == 1
                and isinstance(result[0], torch.fx.Node) and result[0] in self.slots):
            raise NotImplementedError("cpu_graph: the model must return one computed tensor")
        output = self.slots[result[0]]
        last_read = {}
        for step, reads in enumerate(self.reads):
            for slot in reads:
                last_read[slot] = step
        drop_after = [[] for _ in self.reads]
        for slot, step in last_read.items():
            if slot != output:
                drop_after[step].append(slot)
        self.program.finish(drop_after, output)


@torch.no_grad()
def cpu_graph(module, example):
    """Captures ``module(example)`` on CPU as one C++ program; returns ``run(x)`` that replays it.

    The forward is exported (``torch.export``) and each op of its graph becomes a step: the
    fused ops' kernels run on weights packed at capture, every other op is called through the
    dispatcher, and no Python runs between the steps (at batch 1, the Python around each op of
    a converted model costs a large part of the forward). ``module`` may also be the
    ``torch.export.ExportedProgram`` of one (as ``torch.export.load`` returns it), exported for
    ``example``'s shape: its ``.module()`` runs the graph in Python, 17-64% slower at batch 1.
    ``x`` must have ``example``'s shape, dtype and device (any layout); each call returns its
    own result (no buffer is reused between calls, as cuda_graph's output is). Gradients are
    not recorded.

    The weights are taken at capture (packed or copied): changes made to the module afterwards
    are not seen; capture again. Raises NotImplementedError for a graph with a step the program
    cannot hold (an op that writes to a buffer or its input, several inputs or outputs).
    """
    program = _Capture(_exported_for(module, example, "cpu_graph")).program
    example = torch.empty_like(example)  # its shape, dtype and device; not the caller's values

    def run(x):
        _check_like(x, example, "cpu_graph")
        return program.run(x)

    return run


@torch.no_grad()
def export_cpu(module, example):
    """``torch.export`` of ``module(example)`` on CPU as a graph of one op that runs
    ``cpu_graph``'s C++ program: returns a ``torch.export.ExportedProgram`` to save
    (``torch.export.save``), load where ``efficientvit_kernels`` is imported, call (its
    ``.module()``) or compile with AOTInductor, at the speed of the converted model's own
    calls. (Exported op by op, a converted model's ``.module()`` runs each op from Python:
    1.2-1.8x slower at batch 1.)

    ``module`` may also be the ``torch.export.ExportedProgram`` of one, exported for
    ``example``'s shape. The graph's one op, ``efficientvit_cpu.program``, reads one uint8
    buffer, ``plan``: the program's steps and weights (unpacked, so a saved program runs on any
    CPU), named by their SHA-256. The first call in a process builds the program from it,
    packing the fused ops' weights; later calls with a plan of the same name run that program.
    The weights are the module's at export: later changes to the module are not seen. The
    input must have ``example``'s shape and dtype (any layout); the output is contiguous.
    Raises NotImplementedError where ``cpu_graph`` does, and for an argument a plan cannot hold
    (a device, for one).
    """
    exported = _exported_for(module, example, "export_cpu")
    recorded = _RecordedProgram()
    _Capture(exported, program=recorded)
    out = exported.graph.output_node().args[0][0].meta["val"]
    program = _ProgramModule(encode_plan(recorded.calls, example, out), example, out)
    return torch.export.export(program, (torch.empty_like(example),))


class _RecordedProgram:
    """A Program, and the calls of its methods that built it (for encode_plan)."""

    def __init__(self):
        self._program = torch.classes.efficientvit_cpu.Program()
        self.calls = []

    def __getattr__(self, method):  # add_op, add_packing, add_item, finish
        def call(*args):
            self.calls.append((method, args))
            return getattr(self._program, method)(*args)
        return call


class _ProgramModule(torch.nn.Module):
    """What export_cpu exports: one efficientvit_cpu.program op on a plan."""

    def __init__(self, plan, example, out):
        super().__init__()
        self.register_buffer("plan", plan)
        self.input_size, self.input_dtype = list(example.shape), example.dtype
        self.output_size, self.output_dtype = list(out.shape), out.dtype

    def forward(self, x):
        return torch.ops.efficientvit_cpu.program(x, self.plan, self.input_size,
                                                  self.input_dtype, self.output_size,
                                                  self.output_dtype)


@torch.library.register_fake("efficientvit_cpu::program")
def _(x, plan, input_size, input_dtype, output_size, output_dtype):
    torch._check(list(x.shape) == list(input_size) and x.dtype == input_dtype,
                 lambda: f"efficientvit_cpu.program: the program was captured for "
                         f"{list(input_size)} {input_dtype}, got {list(x.shape)} {x.dtype}")
    return x.new_empty(output_size, dtype=output_dtype)


def _exported_for(module, example, what):
    """module's exported program for example: module itself if it is one (checked to be for
    example's shape), else exported now; both on CPU."""
    if not isinstance(example, torch.Tensor) or example.device.type != "cpu":
        raise ValueError(f"{what} needs a CPU tensor")
    if isinstance(module, torch.export.ExportedProgram):
        _check_exported_for(module, example, what)
        exported, tensors = module, module.state_dict.items()
    else:
        exported, tensors = None, [*module.named_parameters(), *module.named_buffers()]
    for name, t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"{what} needs a CPU model, but {name} is on {t.device}")
    return exported or torch.export.export(module, (example,))


def _check_exported_for(exported, example, what):
    """An exported program takes one input of example's static shape and dtype."""
    inputs = [spec.arg.name for spec in exported.graph_signature.input_specs
              if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    vals = [n.meta.get("val") for n in exported.graph.nodes
            if n.op == "placeholder" and n.name in inputs]
    if len(vals) != 1 or not isinstance(vals[0], torch.Tensor):
        raise NotImplementedError(f"{what}: the model takes more than one input")
    shape = tuple(vals[0].shape)
    if not all(isinstance(d, int) for d in shape) or shape != tuple(example.shape) or (
            vals[0].dtype != example.dtype):
        raise ValueError(f"{what}: the program was exported for {shape} {vals[0].dtype}, "
                         f"the example is {tuple(example.shape)} {example.dtype} (export it "
                         "with the example's static shape)")


def cpu_replay(model):
    """Makes ``model``'s calls on CPU replay C++ programs, as ``cpu_graph``'s, captured as it
    runs; returns ``model``. ``convert`` does this to the models it returns (``cpu_replay=True``).

    A call ``model(x)`` is replayed when nothing about it needs Python: one CPU tensor, no
    gradient asked for (``torch.no_grad()``, ``torch.inference_mode()``, or neither x nor any
    weight requiring one), every module in eval mode, no hooks, and no tracing, compiling or
    dispatch mode at work. The second such call with an input of the same shape, strides and
    dtype captures a program for it (``torch.export``, a fraction of a second; over a second
    the first time in a process); later ones run it. Every other call runs module by module, as
    without replay. Unlike ``cpu_graph``'s, the program reads the module's own weights and the
    fused ops' packing cache, so weights changed in place are seen (through ``.data``: call
    ``ops.clear_packing_cache()``, as for the ops); a change to the model itself (a module,
    weight or attribute replaced or added, a hook) is seen at the next call, which drops the
    programs and starts again. After 8 captures a model runs module by module for new inputs.
    A capture that fails warns and leaves that input to the modules.

    Under ``torch.compile`` (not ``torch.export``), a call on a CPU tensor without gradients
    (``torch.no_grad()``, ``torch.inference_mode()``) is one op of the compiled graph,
    ``efficientvit_cpu.replay``, which runs it as a call outside the compiled graph would: the
    program, or the modules. (Traced op by op, the compiled graph calls each op through the
    dispatcher and looks up its packing, which at batch 1 costs what the replay saved.) The
    model must then return one tensor. With gradients, under ``torch.export``, and where the
    model is a submodule of the compiled one (dynamo calls its forward), the modules are
    traced.

    Deep copies and pickles of the model run module by module until passed here again.
    """
    model._compiled_call_impl = _Replay(model)  # nn.Module.__call__ calls it in place of forward
    return model


# handle -> _Replay: the model an op call stands for. (A string: torch.compile takes it as a
# constant of the graph, where an int attribute may become an input of it.)
_REPLAYS = weakref.WeakValueDictionary()
_handles = itertools.count()


# Defined and implemented here, not with the kernels' ops: a Python object is its state. (Not
# torch.library.custom_op: its wrappers cost ~0.1 ms a call.)
_LIBRARY = torch.library.Library("efficientvit_cpu", "FRAGMENT")
_LIBRARY.define("replay(Tensor x, str model) -> Tensor")


def _one_tensor(out, module):
    if not isinstance(out, torch.Tensor):
        raise NotImplementedError(
            f"efficientvit_kernels.cpu_replay: under torch.compile the call of {type(module).__name__} "
            f"is one op, which must return one tensor, not {type(out).__name__} (convert the model "
            "with cpu_replay=False)")
    return out


def _replay_op(x, model):
    """``model(x)`` for the model passed to ``cpu_replay`` that has the handle ``model``, as a
    call outside a compiled graph runs it."""
    replay = _REPLAYS[model]
    return _one_tensor(replay.run(x), replay._model)


_LIBRARY.impl("replay", _replay_op, "CPU")


@torch.library.register_fake("efficientvit_cpu::replay", lib=_LIBRARY)
def _(x, model):
    module = _REPLAYS[model]._model  # its forward on weights like x: fake, or on "meta"
    like_x = {name: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=x.device)
              for name, t in itertools.chain(module.named_parameters(), module.named_buffers())}
    out = _one_tensor(torch.func.functional_call(module, like_x, (x,)), module)
    return torch.empty_strided(out.shape, out.stride(), dtype=out.dtype)  # new, as the op's


class _Replay:
    """The call that cpu_replay installs: its programs, per input shape, strides and dtype, and
    the model state they were captured for."""

    max_captures = 8

    def __init__(self, model):
        self._model = model
        self._lock = threading.Lock()
        self._state = None      # the model's _ModelState at the last call
        self._captured = None   # the _ModelState the programs were captured in
        self._programs = {}     # input key -> Program, or None where a capture failed
        self._seen = set()      # input keys called once since the state was taken
        self._captures = 0
        self._fast = None       # the FastCall of the last program run, or None
        self._fast_calls = {}   # input key -> (FastCall, the state's version and changes then)
        self._handle = str(next(_handles))
        _REPLAYS[self._handle] = self

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs:
            if not torch.compiler.is_compiling():
                return self.run(args[0])
            if _compiled_as_one_op(args[0]):
                return torch.ops.efficientvit_cpu.replay(args[0], self._handle)
        return self._model._call_impl(*args, **kwargs)

    def run(self, x):
        """model(x) as called outside a compiled graph: a program where nothing about the call
        needs Python, else the modules."""
        if self._fast is not None:  # the last program run, with every check in one C call
            out = _C.fast_call(self._fast, x, _Fused.changes)
            if out is not None:
                return out
        program = self._program(self._model, x) if _replayable(x) else None
        if program is None:
            return self._model._call_impl(x)
        self._fast = self._fast_call(program, x)
        return program.run(x)

    def _fast_call(self, program, x):
        """The FastCall of program for inputs like x in the model's state now (after _program
        found the program for x)."""
        state, key = self._state, _input_key(x)
        fast, version, changes = self._fast_calls.get(key, (None, None, None))
        if fast is None or version != state.version or changes != state.fused_changes:
            fast = _C.fast_call_for(program, x, state.dicts, state.fused_changes,
                                    _global_module_hook_dicts(), state.tensors)
            self._fast_calls[key] = (fast, state.version, state.fused_changes)
        return fast

    def _program(self, model, x):
        state = self._state
        if state is None or state.changed():
            with self._lock:
                self._state = state = _ModelState(model)
        if not state.replayable():
            return None
        if state is not self._captured and self._captured is not None:
            with self._lock:  # back as captured (eval after train), or changed: start again
                if self._captured.differs(state):
                    self._programs, self._seen, self._captured = {}, set(), None
                    self._fast, self._fast_calls = None, {}
                else:
                    self._state = self._captured
        key = _input_key(x)
        program = self._programs.get(key, _MISSING)
        if program is not _MISSING:
            return program
        with self._lock:
            if self._captures >= self.max_captures:
                return None
            if key not in self._seen:
                self._seen.add(key)
                return None
            self._captures += 1
            self._programs[key] = program = self._capture(model, x)
            # as the capture left it (export restores the model)
            self._state = self._captured = _ModelState(model)
        return program

    @staticmethod
    def _capture(model, x):
        try:  # as a plain call would (efficientvit_cpu.replay may run it amid a dispatch mode's)
            with (torch._C._ForceDispatchKeyGuard(*_PLAIN_DISPATCH_KEYS),
                  torch.inference_mode(False), torch.no_grad()):
                example = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
                return _Capture(torch.export.export(model, (example,)), live=model).program
        except Exception as e:  # noqa: BLE001  the modules compute what the program would
            warnings.warn(f"efficientvit_kernels.cpu_replay: {type(model).__name__} on "
                          f"{tuple(x.shape)} {x.dtype} runs module by module: no program "
                          f"({type(e).__name__}: {e})", stacklevel=4)
            return None


_MISSING = object()


def _input_key(x):
    """What a program is captured for (_C.fast_call checks the same)."""
    return x.shape, x.stride(), x.dtype


_PLAIN_DISPATCH_KEYS = (torch._C._dispatch_tls_local_include_set(),
                        torch._C._dispatch_tls_local_exclude_set())


def _compiled_as_one_op(x):
    """Whether a call traced while compiling (the caller checks that) is torch.compile's, not
    export's, and may be one op: a CPU tensor (not the fake one of the op's own fake run), no
    gradient to record."""
    return (not torch.compiler.is_exporting() and type(x) is torch.Tensor and x.is_cpu
            and not torch.is_grad_enabled())


def _replayable(x):
    """Whether a call on x may skip the model's Python: a plain CPU tensor, no gradient, and
    no tracing, compiling or mode that must see each op."""
    return (type(x) is torch.Tensor and x.is_cpu and x.layout == torch.strided
            and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling() and torch._C._get_tracing_state() is None
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._functorch.is_functorch_wrapped_tensor(x))


class _ModelState:
    """What a program captured from a model assumed: every module's attributes, parameters,
    buffers, children and hooks, as they were (a forward reads nothing else without a change to
    its code; an empty dict of parameters, buffers or children is left out: a forward that
    reads none ignores what is added). Compared by the dicts' versions (_C.max_dict_version:
    any change to one of them moves the largest), and only where they moved (or, from Python
    3.14, on every call) by their values, in C loops: at batch 1 a Python loop over the
    model's modules would cost a tenth of what replay saves. The fused modules' attributes
    and hooks (most of the model's) are compared only after one was set or registered
    (_Fused.changes), or while one of them has hooks (their removal is not counted); their
    weights on every call."""

    def __init__(self, model):
        modules = list(model.modules())
        ours = [isinstance(m, _Fused) for m in modules]
        hooks = [[m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                  m._backward_pre_hooks] for m in modules]
        self.fused_hooks = [d for h, fused in zip(hooks, ours) if fused for d in h]
        self.fused_hooked = any(self.fused_hooks)
        self.hooked = self.fused_hooked or any(d for h in hooks for d in h)
        # hooks added or removed change the values' count
        self.dicts = [d for m, fused in zip(modules, ours)
                      for d in ((m._buffers,) if fused else
                                (m.__dict__, m._parameters, m._buffers, m._modules))
                      if d or d is m.__dict__]
        self.dicts += [d for h, fused in zip(hooks, ours) if not fused or self.fused_hooked
                       for d in h]
        self.version = _C.max_dict_version(self.dicts)
        self.values = _Values(self.dicts)
        self.fused_dicts = [m.__dict__ for m, fused in zip(modules, ours) if fused]
        self.fused_values = _Values(self.fused_dicts)
        self.fused_changes = _Fused.changes
        self.tensors = self.values.tensors
        self.eval = not any(m.training for m, fused in zip(modules, ours) if not fused)

    def changed(self):
        if _Fused.changes != self.fused_changes:
            if (self.fused_values.differ(_Values.of(self.fused_dicts))
                    or any(self.fused_hooks) != self.fused_hooked):
                return True
            self.fused_changes = _Fused.changes
        version = _C.max_dict_version(self.dicts)
        if version is not None and version == self.version:
            return False
        if self.values.differ(_Values.of(self.dicts)):
            return True
        self.version = version  # changed back, or set to the same values
        return False

    def differs(self, other):
        return (self.values.differ(other.values.values)
                or self.fused_values.differ(other.fused_values.values))

    def replayable(self):
        """No hook to call, no module training, no gradient to record for a weight."""
        return (self.eval and not self.hooked and not _global_module_hooks()
                and not (torch.is_grad_enabled()
                         and any(map(operator.attrgetter("requires_grad"), self.tensors))))


class _Values:
    """The values of some dicts, in order: tensors compared by identity (a program holds the
    objects), the rest by value."""

    def __init__(self, dicts):
        self.values = self.of(dicts)
        positions = [i for i, v in enumerate(self.values) if isinstance(v, torch.Tensor)]
        self.tensors = [self.values[i] for i in positions]
        self.take_tensors = operator.itemgetter(*positions) if len(positions) > 1 else (
            lambda values: tuple(values[i] for i in positions))

    @staticmethod
    def of(dicts):
        return list(itertools.chain.from_iterable(map(dict.values, dicts)))

    def differ(self, values):
        try:  # identical elements compare equal without a call; a tensor replaced may raise
            if values != self.values:
                return True
        except Exception:  # noqa: BLE001  (ambiguous truth of a compared tensor or array)
            return True
        return not all(map(operator.is_, self.take_tensors(values), self.tensors))


def _global_module_hook_dicts():
    m = torch.nn.modules.module
    return [m._global_forward_hooks, m._global_forward_pre_hooks, m._global_backward_hooks,
            m._global_backward_pre_hooks]


def _global_module_hooks():
    return any(_global_module_hook_dicts())
