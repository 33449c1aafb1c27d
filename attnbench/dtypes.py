"""dtype names: the one table between the short names users type (``fp32``) and torch."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "ALIASES", "dtype_name", "parse_dtype"]

#: short name -> torch dtype, most precise first
DTYPES: dict[str, torch.dtype] = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

#: other spellings accepted on input
ALIASES: dict[str, str] = {
    "float64": "fp64",
    "double": "fp64",
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
}

_NAMES = {dt: name for name, dt in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"fp32"`` (other dtypes: torch's own name)."""
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def parse_dtype(name: object) -> str:
    """The short name for ``name`` (a short name or an alias). Raises ``ValueError``."""
    key = ALIASES.get(str(name), str(name))
    if key not in DTYPES:
        raise ValueError(f"dtype={name!r}: unknown; choose one of: {', '.join(DTYPES)}")
    return key
