"""Running code in a fresh interpreter, for tests of what importing does (or does not
do): the test process has long imported everything."""

from __future__ import annotations

import subprocess
import sys


def run_fresh(code: str, *, blocked: tuple[str, ...] = ()) -> str:
    """Runs ``code`` (``python -c``) in a new interpreter in which importing any module of
    ``blocked`` fails as if it were not installed; asserts that it exits with status 0
    and returns what it printed."""
    prelude = "".join(f"import sys; sys.modules[{name!r}] = None\n" for name in blocked)
    r = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout
