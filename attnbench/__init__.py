"""attnbench: Longformer-style attention (sliding window, dilation, global tokens),
implemented several ways, checked against a float64 reference, timed and profiled.

Importing this package needs torch alone; implementations load on first use.
"""

from .pattern import Pattern
from .reference import default_scale, reference, reference_rows
from .registry import (
    FEATURES,
    Impl,
    UnsupportedError,
    attention,
    describe,
    get_impl,
    list_impls,
    register,
)

__all__ = [
    "FEATURES",
    "Impl",
    "Pattern",
    "UnsupportedError",
    "attention",
    "default_scale",
    "describe",
    "get_impl",
    "list_impls",
    "reference",
    "reference_rows",
    "register",
]

__version__ = "0.1.0"
