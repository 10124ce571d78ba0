"""The safetensors dtype names, once: what every reader and writer of a shard agrees on.

``SAFETENSORS_DTYPES`` maps each name safetensors writes in a header's ``"dtype"`` to the torch
dtype of its elements, in the order of safetensors' ``Dtype`` enum (its writer puts the tensors of
the highest rank first: ``shard_io.safetensors_header``). A name outside this table is refused by
the header check (``safetensors_io.read_header``); every other module takes sizes and torch dtypes
from here.
"""

from __future__ import annotations

import torch

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "C64": torch.complex64, "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64}

# torch dtype -> its name in a header, for the writer.
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# name -> rank in safetensors' Dtype enum: the writer orders tensors by it, highest first.
DTYPE_RANK: dict[str, int] = {name: rank for rank, name in enumerate(SAFETENSORS_DTYPES)}
# name -> bytes per element.
DTYPE_BYTES: dict[str, int] = {name: dtype.itemsize for name, dtype in SAFETENSORS_DTYPES.items()}
