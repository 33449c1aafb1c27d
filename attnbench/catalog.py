"""``python -m attnbench describe``: every implementation, whether it runs here (and
why not), its devices, dtypes, grouped-query attention (native or k, v repeated),
features and caveats (what a device refuses or runs only slowly).

A module of its own name, not ``attnbench.describe``: importing a submodule sets the
package's attribute of that name, which would hide the function
:func:`attnbench.describe`.
"""

from __future__ import annotations

from .registry import describe


def table() -> str:
    """The implementations as a text table, a line per caveat or reason under each."""
    rows = describe()
    cols = ["name", "available", "devices", "dtypes", "gqa", "features"]
    cells = [[str(r[c]) if c != "available" else ("yes" if r[c] else "no") for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    for r, t in zip(rows, cells):
        lines.append("  ".join(x.ljust(w) for x, w in zip(t, widths)).rstrip())
        if r["reason"]:
            lines.append(f"    not available: {r['reason']}")
        lines.extend(f"    {c}" for c in r["caveats"])
    return "\n".join(lines)
