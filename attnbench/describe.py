"""``python -m attnbench.describe``: every implementation, whether it runs here
(and why not), its devices, dtypes, grouped-query attention (native or k, v repeated) and features."""

from __future__ import annotations

from attnbench import describe


def main() -> None:
    rows = describe()
    cols = ["name", "available", "devices", "dtypes", "gqa", "features"]
    table = [[str(r[c]) if c != "available" else ("yes" if r[c] else "no") for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r, t in zip(rows, table):
        print("  ".join(x.ljust(w) for x, w in zip(t, widths)))
        if r["reason"]:
            print(f"    not available: {r['reason']}")


if __name__ == "__main__":
    main()
