"""attnbench: Longformer-style attention (sliding window, dilation, global tokens),
implemented several ways, checked against a float64 reference, timed and profiled.

Importing this package needs torch alone; implementations load on first use.
"""

from pathlib import Path as _Path

# The implementations and the Hydra configs are ``attnbench.impls`` and
# ``attnbench.conf``. An installed attnbench has them inside the package (pyproject
# maps the repository's top-level impls/ and conf/ there); a plain checkout keeps
# them beside it, so the checkout's root is searched too.
_ROOT = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "impls").is_dir() and (_ROOT / "impls" / "__init__.py").is_file():
    __path__.append(str(_ROOT))

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
