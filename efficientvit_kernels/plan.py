"""The plan of an exported C++ program (``export_cpu``): the calls that build a
``efficientvit_cpu.Program``, written to one uint8 tensor that ``Program::from_plan``
(csrc/cpu/program.cpp) reads back without Python. The layout is defined there, in
program.h; this file writes it."""
import hashlib
import struct

import torch

__all__ = ["encode"]

MAGIC = int.from_bytes(b"EVTPLAN1", "little")
HEADER_BYTES = 64  # magic, 3 x int64 (token count, data offset, data bytes), 32-byte digest
ALIGN = 64

# c10::ScalarType and c10::MemoryFormat as the C++ side numbers them: an argument of either
# type is an int there.
SCALAR_TYPES = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4,
                torch.float16: 5, torch.float32: 6, torch.float64: 7, torch.bool: 11,
                torch.bfloat16: 15}
MEMORY_FORMATS = {torch.contiguous_format: 0, torch.preserve_format: 1,
                  torch.channels_last: 2, torch.channels_last_3d: 3}

NONE, BOOL, INT, FLOAT, STRING, LIST, TUPLE, TENSOR = range(8)


class _Writer:
    def __init__(self):
        self.tokens = []
        self.tensors = {}  # id -> (index, tensor): a tensor named twice is written once

    def value(self, v):
        t = self.tokens
        if v is None:
            t.append(NONE)
        elif isinstance(v, bool):
            t += [BOOL, int(v)]
        elif isinstance(v, int):
            t += [INT, v]
        elif isinstance(v, float):
            t += [FLOAT, struct.unpack("<q", struct.pack("<d", v))[0]]
        elif isinstance(v, str):
            data = v.encode()
            t += [STRING, len(data), *data]
        elif isinstance(v, (list, tuple)):
            t += [LIST if isinstance(v, list) else TUPLE, len(v)]
            for item in v:
                self.value(item)
        elif isinstance(v, torch.Tensor) and v.dtype in SCALAR_TYPES and v.layout == torch.strided:
            index, _ = self.tensors.setdefault(id(v), (len(self.tensors), v))
            t += [TENSOR, index]
        elif isinstance(v, torch.dtype) and v in SCALAR_TYPES:
            t += [INT, SCALAR_TYPES[v]]
        elif isinstance(v, torch.memory_format):
            t += [INT, MEMORY_FORMATS[v]]
        else:
            raise NotImplementedError(f"export_cpu: an op of the model takes {v!r}, which a "
                                      "plan cannot hold")


def _aligned(n):
    return -(-n // ALIGN) * ALIGN


def encode(calls, input, output):
    """The plan of ``calls``: (method, arguments) pairs, each a call of a Program's add_op,
    add_packing, add_item or finish, as one uint8 tensor; the program takes a tensor like
    ``input`` and returns one like ``output`` (their shapes and dtypes)."""
    writer = _Writer()
    signature = [(list(t.shape), SCALAR_TYPES[t.dtype]) for t in (input, output)]
    writer.value([signature, [(method, list(args)) for method, args in calls]])
    calls_tokens, writer.tokens = writer.tokens, []
    table, blobs, data_bytes = [], [], 0
    for _, t in sorted(writer.tensors.values(), key=lambda item: item[0]):
        table.append((SCALAR_TYPES[t.dtype], list(t.shape), data_bytes))
        blobs.append((data_bytes, t.detach().contiguous().reshape(-1).view(torch.uint8)))
        data_bytes = _aligned(data_bytes + t.numel() * t.element_size())
    writer.value(table)
    tokens = torch.tensor(writer.tokens + calls_tokens, dtype=torch.int64).view(torch.uint8)
    data_at = _aligned(HEADER_BYTES + tokens.numel())
    buffer = bytearray(data_at + data_bytes)
    plan = torch.frombuffer(buffer, dtype=torch.uint8)
    plan[HEADER_BYTES:HEADER_BYTES + tokens.numel()] = tokens
    for at, blob in blobs:
        plan[data_at + at:data_at + at + blob.numel()] = blob
    counts = struct.pack("<4q", MAGIC, tokens.numel() // 8, data_at, data_bytes)
    buffer[:HEADER_BYTES] = counts + hashlib.sha256(memoryview(buffer)[HEADER_BYTES:]).digest()
    return plan
