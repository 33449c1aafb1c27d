"""Child process of an isolated measurement: reads a BenchConfig as JSON on stdin,
measures it, prints the row as one ``ATTNBENCH_ROW {json}`` line on stdout."""

from __future__ import annotations

import json
import sys


def main() -> None:
    from attnbench.bench import BenchConfig, _measure_here

    cfg = BenchConfig.from_dict(json.loads(sys.stdin.read()))
    row = _measure_here(cfg)
    tb = row.pop("traceback", None)
    if tb:
        print(tb, file=sys.stderr)
    sys.stdout.write("ATTNBENCH_ROW " + json.dumps(row, default=str) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
