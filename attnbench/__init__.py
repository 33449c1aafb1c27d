"""attnbench: Longformer-style attention (sliding window, dilation, global tokens),
implemented several ways, checked against a float64 reference, timed and profiled.

Importing this package needs torch alone; implementations load on first use.
"""

from .layout import map_folders as _map_folders

_map_folders()  # attnbench.impls and attnbench.conf, run from a checkout (attnbench.layout)

from .pattern import Pattern  # noqa: E402
from .reference import default_scale, reference, reference_rows  # noqa: E402
from .registry import (  # noqa: E402
    FEATURES,
    Impl,
    UnsupportedError,
    attention,
    available_impls,
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
    "available_impls",
    "default_scale",
    "describe",
    "get_impl",
    "list_impls",
    "reference",
    "reference_rows",
    "register",
]

__version__ = "0.1.0"
