"""Command line: ``python -m attnbench [key=value ...] [-m]`` (Hydra).

The Hydra layer is thin: it composes ``conf/config.yaml`` into a
:class:`attnbench.bench.BenchConfig` (plus an optional internal ``sweep`` grid) and
hands it to :func:`attnbench.bench.sweep`. Everything works without Hydra through
that Python API.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

_CHOICES = {
    "dtype": ("auto", "fp64", "fp32", "fp16", "bf16", "float64", "float32", "float16", "bfloat16"),
    "mode": ("fwd", "bwd", "fwd_bwd"),
    "device": ("auto", "cpu", "cuda"),
    "row_files": ("auto", "true", "false", "True", "False"),
}
_POSITIVE = ("seq_len", "batch", "heads", "head_dim")


def _values(raw: str, multirun: bool) -> list[str]:
    if multirun and "(" not in raw and "[" not in raw:
        return [v.strip() for v in raw.split(",")]
    return [raw.strip()]


def precheck(argv: list[str]) -> str | None:
    """Validate the common overrides before Hydra runs: one clear line per mistake."""
    multirun = "-m" in argv or "--multirun" in argv
    for arg in argv:
        if arg.startswith(("-", "hydra", "+", "~")) or "=" not in arg:
            continue
        key, raw = arg.split("=", 1)
        for val in _values(raw, multirun):
            if key in ("impl", "pattern", "experiment"):
                group = CONF_DIR / key
                names = sorted(p.stem for p in group.glob("*.yaml"))
                if val not in names and not (key == "experiment" and val == "null"):
                    return f"{key}={val!r}: unknown; choose one of: {', '.join(names)}"
            elif key in _CHOICES and val not in _CHOICES[key]:
                return f"{key}={val!r}: unknown; choose one of: {', '.join(_CHOICES[key])}"
            elif key in _POSITIVE and val != "null":
                if not val.isdigit() or int(val) < 1:
                    return f"{key}={val!r}: must be an int >= 1"
            elif key == "window":
                if not val.isdigit() or int(val) % 2:
                    return f"window={val!r}: must be an even int >= 0 (neighbours per query besides itself)"
    return None


def _device_tag(device: str) -> str:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower().replace("nvidia", "").strip()
        return "cuda-" + "-".join(name.split())
    return "cpu"


def build_configs(d: dict) -> tuple[list, bool, list[str]]:
    """(configs, resume, notes) from a composed config dict."""
    import attnbench
    from attnbench.bench import BenchConfig, expand

    d = dict(d)
    grid = dict(d.pop("sweep", None) or {})
    resume = bool(d.pop("resume", False))
    base = BenchConfig.from_dict(d)
    notes = []
    if "{device}" in base.study:
        base = dataclasses.replace(base, study=base.study.replace("{device}", _device_tag(base.device)))
    if grid.get("impl") == "all" or grid.get("impl") == ["all"]:
        dev = base.resolved().device
        avail = []
        for name in attnbench.list_impls():
            im = attnbench.get_impl(name)
            why = im.unavailable_reason()
            if why or dev not in im.devices:
                notes.append(f"{name}: not run ({why or 'does not run on ' + dev})")
            else:
                avail.append(name)
        grid["impl"] = avail
    for k, v in list(grid.items()):
        if not isinstance(v, list):
            grid[k] = [v]
        grid[k] = [tuple(x) if isinstance(x, list) else x for x in grid[k]]
    return expand(base, grid), resume, notes


def _task(cfg) -> None:
    from omegaconf import OmegaConf

    from attnbench.bench import format_rows, results_path, row_files_enabled, rows_dir, sweep

    d = OmegaConf.to_container(cfg, resolve=True)
    try:
        configs, resume, notes = build_configs(d)
        configs = [c.resolved() for c in configs]
        row_files = row_files_enabled(_row_files_setting(d.get("row_files", "auto")))
    except ValueError as e:
        print(f"attnbench: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    rows = sweep(configs, resume=resume, row_files=row_files)
    if rows:
        print(format_rows(rows))
        if row_files:
            for p in sorted({str(rows_dir(c)) for c in configs}):
                print(f"rows: {p}/ (into the table: python -m attnbench.merge {p})")
        else:
            for p in sorted({str(results_path(c)) for c in configs}):
                print(f"results: {p}")


def _row_files_setting(value: object) -> object:
    """``row_files=auto`` means row files under a submitit launcher (each job on its own)."""
    if str(value).strip().lower() == "auto":
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized() and "submitit" in str(HydraConfig.get().launcher.get("_target_", "")):
            return True
    return value


def main() -> None:
    argv = sys.argv[1:]
    err = precheck(argv)
    if err:
        print(f"attnbench: {err}", file=sys.stderr)
        raise SystemExit(2)
    try:
        import hydra
        from omegaconf import OmegaConf
    except ImportError:
        print(
            "attnbench: the command line needs hydra-core (pip install hydra-core); "
            "the Python API (attnbench.bench.measure / sweep) works without it",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    if not OmegaConf.has_resolver("range"):
        OmegaConf.register_new_resolver("range", lambda a, b: list(range(int(a), int(b))))
    if not CONF_DIR.is_dir():
        print(f"attnbench: config folder not found next to the package ({CONF_DIR.name}/)", file=sys.stderr)
        raise SystemExit(2)
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
