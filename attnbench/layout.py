"""Where attnbench's two top-level folders are found: ``attnbench.impls`` (the
implementations) and ``attnbench.conf`` (the Hydra configs) are the repository's
``impls/`` and ``conf/``.

An installed attnbench has them inside the package (pyproject.toml's ``package-dir``
maps them there). Run from a checkout, with nothing installed, :func:`map_folders`
maps these two, and nothing else, as subpackages; ``import attnbench`` calls it, and
:func:`impls_package` is how the registry finds the implementations.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE = __name__.rpartition(".")[0]
FOLDERS = ("impls", "conf")


def map_folders() -> None:
    """Map the checkout's ``impls/`` and ``conf/`` as ``attnbench.impls`` and
    ``attnbench.conf`` unless the package has its own (an installed attnbench)."""
    here = Path(__file__).resolve().parent
    for name in FOLDERS:
        full, init = f"{PACKAGE}.{name}", here.parent / name / "__init__.py"
        if full in sys.modules or (here / name).is_dir() or not init.is_file():
            continue
        spec = importlib.util.spec_from_file_location(full, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        setattr(sys.modules[PACKAGE], name, module)  # as the import system binds a subpackage


def impls_package() -> ModuleType:
    """The package of the bundled implementations, ``attnbench.impls``."""
    map_folders()
    return importlib.import_module(f"{PACKAGE}.impls")
