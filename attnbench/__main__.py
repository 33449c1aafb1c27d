"""Command line: ``python -m attnbench [key=value ...] [-m]`` (Hydra), and
``python -m attnbench describe`` (the implementations, :mod:`attnbench.catalog`).

The settings and their defaults are the dataclass :class:`attnbench.config.RunConfig`,
Hydra's structured config; ``conf/config.yaml`` (shipped as ``attnbench.conf``) holds
only Hydra's own settings and the ``--help`` text, which lists the settings from it.
Before Hydra runs anything, every job the command line describes (each combination of
a ``-m`` sweep, each point of an internal ``sweep=`` grid) is composed and validated,
and every results folder checked: a bad setting is one line naming the setting, the
value and what is allowed, exit status 2, and nothing is written. Then Hydra runs the
jobs (with its basic launcher, or a submitit one for SLURM) and each hands its
configurations to :func:`attnbench.sweep.sweep`, prints its rows and draws the figure
its ``figure`` setting names from the study's table (:func:`attnbench.plot.write_figure`).
The jobs of a ``-m`` sweep on the basic launcher are measured together, after Hydra has
formed them all, so that ``repeats`` interleaves their implementations.

Exit status 1: a row of the run is ``wrong`` or ``error``; the table is printed and the
figure drawn first, then one line names those rows (``skipped`` and ``oom`` rows are
results: status 0). In a ``-m`` sweep every job runs, and the command exits 1 at the end.
"""

from __future__ import annotations

import itertools
import logging
import logging.config
import os
import re
import signal
import sys
from importlib import resources

from .config import SETTINGS, BenchConfig, RunConfig, setting_error

log = logging.getLogger("attnbench")

CONFIG_MODULE = "attnbench.conf"
GROUPS = ("pattern", "experiment")
#: Hydra flags that print something instead of running jobs
_NO_RUN = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc", "--version"}


def register_schema() -> None:
    """Make the schema and the ``range`` resolver known to Hydra (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="attnbench_schema", node=RunConfig)
    if not OmegaConf.has_resolver("range"):
        OmegaConf.register_new_resolver("range", lambda a, b: list(range(int(a), int(b))))
    if not OmegaConf.has_resolver("by_device"):  # ${by_device:${device},<cpu value>,<cuda value>}
        OmegaConf.register_new_resolver("by_device", _by_device)


def _by_device(device: str, on_cpu: object, on_cuda: object) -> object:
    import torch

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return on_cuda if cuda else on_cpu


def build_configs(d: dict, here: bool = True) -> tuple[list[BenchConfig], bool, object]:
    """(configurations, resume, row_files) from a composed configuration, resolved for
    this machine; with ``here=False`` (jobs that run on another machine) validated only,
    ``device=auto`` and ``study=x-{device}`` left for the job's machine. ``sweep.impl: all``
    means every implementation available on the job's device."""
    from .registry import available_impls, list_impls
    from .sweep import expand

    d = dict(d)
    grid = {k: v if isinstance(v, list) else [v] for k, v in dict(d.pop("sweep", None) or {}).items()}
    resume, row_files = d.pop("resume", False), d.pop("row_files", "auto")
    if setting_error("resume", resume):
        raise ValueError(setting_error("resume", resume))
    base = BenchConfig.from_dict(d)
    if grid.get("impl") == ["all"]:
        if not here:
            grid["impl"] = list_impls()  # what runs is decided on the job's machine
        else:
            device = base.resolved().device
            grid["impl"] = [im.name for im in available_impls(device)]
            skipped = sorted(set(list_impls()) - set(grid["impl"]))
            if skipped:
                log.info(
                    "impl=all on %s: %s not available here (python -m attnbench describe says why)", device, skipped
                )
    configs = expand(base, grid)
    for c in configs:
        c.validate()
    return [c.resolved() for c in configs] if here else configs, resume, row_files


# ---------------------------------------------------------------------- the check before Hydra runs
def _group_options(group: str) -> list[str]:
    folder = resources.files(CONFIG_MODULE) / group
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _explain(e: BaseException, job: list[str]) -> str:
    """One line for a composition error: the setting, the value, what is allowed."""
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    values = {a.split("=", 1)[0].lstrip("+~"): a.split("=", 1)[1] for a in job if "=" in a}
    if cause is not None and getattr(cause, "full_key", None):
        key = str(cause.full_key)
        if isinstance(cause, ConfigKeyError) or "not in" in str(cause):
            return f"{key}: unknown setting; the settings are: {', '.join(SETTINGS)}"
        raw = values.get(key, "")
        return setting_error(key, raw) or f"{key}={raw!r}: {str(cause).splitlines()[0]}"
    return " ".join(str(e).split())


def precheck(argv: list[str], planned: list[BenchConfig] | None = None) -> str | None:
    """Compose and validate every job of this command line; the first problem, or None.
    The configurations of jobs that write row files (a submitit launcher) are added to
    ``planned``."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .sweep import row_files_enabled
    from .tables import check_writable, rows_dir, table_path

    overrides = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        return " ".join(str(e).split("See https")[0].split())
    for o in parsed:
        group = o.key_or_group
        if group in GROUPS and o.value() is not None:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            allowed = _group_options(group)
            for v in values:
                if v not in allowed and not (group == "experiment" and v == "null"):
                    return f"{group}={v!r}: unknown; choose one of: {', '.join(allowed)}"
    multirun = "-m" in argv or "--multirun" in argv
    jobs = _jobs(parsed) if multirun else [overrides]
    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        checked = set()
        for job in jobs:
            remote = "slurm" in _launcher(job)  # jobs run on other machines
            try:
                d = _container(compose("config", overrides=job))
                configs, _, row_files = build_configs(d, here=not remote)
                files = row_files_enabled(_row_files_setting(row_files, job))
            except ValueError as e:
                return str(e)
            except Exception as e:
                return _explain(e, job)
            if files and planned is not None:
                planned.extend(configs)
            for c in configs:
                path = rows_dir(c) / "row.csv" if files else table_path(c)
                if path not in checked:
                    checked.add(path)
                    try:
                        check_writable(path)
                    except ValueError as e:
                        return str(e)
    GlobalHydra.instance().clear()
    return None


def _jobs(parsed: list) -> list[list[str]]:
    """The jobs of a ``-m`` command line, as Hydra's basic sweeper forms them: the
    cartesian product of every sweep override's values, in command-line order."""
    choices = []
    for o in parsed:
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        choices.append([f"{key}={v}" for v in values])
    return [list(job) for job in itertools.product(*choices)]


def _container(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _launcher(job: list[str]) -> str:
    """The hydra/launcher option a job's overrides name ("" for Hydra's basic one)."""
    return next((a.split("=", 1)[1] for a in job if a.startswith("hydra/launcher=")), "")


def _row_files_setting(value: object, job: list[str] | None = None) -> object:
    """``row_files=auto`` means row files under a submitit launcher (each job on its own)."""
    if str(value).strip().lower() != "auto":
        return value
    if job is not None:  # before Hydra runs: read the launcher from the overrides
        launcher = _launcher(job)
        return "submitit" in launcher or launcher.startswith("attnbench_") or "auto"
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and "submitit" in str(HydraConfig.get().launcher.get("_target_", "")):
        return True
    return value


# ---------------------------------------------------------------------- running
def _task(cfg) -> None:
    """One Hydra job: its configurations measured now, or, in a ``-m`` sweep on Hydra's
    basic launcher (every job in this process, one after another), kept for one
    interleaved sweep of all of them once Hydra has formed every job (:func:`main`)."""
    from .sweep import row_files_enabled

    try:
        configs, resume, row_files = build_configs(_container(cfg))
        use_files = row_files_enabled(_row_files_setting(row_files))
    except ValueError as e:  # validated before Hydra started; only a changed machine gets here
        print(f"attnbench: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if _basic_multirun():
        _PENDING.setdefault((resume, use_files), []).extend(configs)
        from hydra.core.hydra_config import HydraConfig

        _LOGGING.update(_container(HydraConfig.get().job_logging))  # for the sweep after the jobs
    else:
        _run(configs, resume, use_files)


def _basic_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():  # _task called outside Hydra
        return False
    hc = HydraConfig.get()
    return hc.mode == RunMode.MULTIRUN and "BasicLauncher" in str(hc.launcher.get("_target_", ""))


def _run(configs: list[BenchConfig], resume: bool, use_files: bool) -> None:
    """Measure ``configs`` in one sweep (interleaved where ``repeats`` > 1), print the
    rows, draw each study's figure, and note the wrong and error rows for the exit status."""
    from .results import format_rows
    from .sweep import sweep
    from .tables import ResultsError, rows_dir, table_path

    rows = sweep(configs, resume=resume, row_files=use_files)
    if rows:
        print(format_rows(rows))
    if rows and not use_files:  # the figure of each study's table (a resumed run's rows join the earlier ones)
        from .plot import write_figure

        for table, c in {table_path(c): c for c in configs}.items():
            try:
                for p in write_figure(c.figure, table):
                    print(f"figure: {p}")
            except ResultsError as e:
                print(f"figure: not drawn: {' '.join(str(e).split())}")
    for p in sorted({str(rows_dir(c) if use_files else table_path(c)) for c in configs}):
        print(f"rows: {p}/ (into the table: python -m attnbench.merge {p})" if use_files else f"results: {p}")
    failed = [r for r in rows if r.get("status") in ("wrong", "error")]  # skipped and oom rows are results
    if failed:
        which = "; ".join(f"{r['impl']} n={r['seq_len']} {r['dtype']} {r['mode']}" + (" in the model" if r.get("model")
                          else "") + f": {r['status']}" for r in failed)  # fmt: skip
        print(f"attnbench: {len(failed)} of {len(rows)} rows failed: {which}", file=sys.stderr)
        _FAILED.extend(failed)  # the exit status, once every job of a -m sweep has run


#: the wrong and error rows of this command's jobs: exit status 1 at the end
_FAILED: list[dict] = []
#: a basic ``-m`` sweep's configurations, by (resume, row files), measured after Hydra's jobs
_PENDING: dict[tuple[bool, bool], list[BenchConfig]] = {}
_LOGGING: dict = {}  # the jobs' logging configuration (Hydra's own is in place after them)


def _normalise(arg: str) -> str:
    """Two conveniences Hydra's grammar lacks. ``study=x-{device}``: Hydra reads braces
    as a dictionary, but the placeholder is ours, so the value is quoted for it.
    ``sweep.<field>=...``: an axis of the internal sweep, added or replaced (``++``)
    whether or not an experiment already has it."""
    m = re.fullmatch(r"(\+?study)=([^'\"].*\{device\}.*)", arg)
    if m:
        return f"{m.group(1)}='{m.group(2)}'"
    return re.sub(r"^\+?(sweep\.\w+=)", r"++\1", arg)


_KEPT = "the rows measured so far are in the results table"


def _stop(signum, frame) -> None:
    print(f"\nattnbench: stopped ({signal.Signals(signum).name}); {_KEPT}", file=sys.stderr)
    raise SystemExit(128 + signum)  # unwinds: the measuring child is stopped too


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    if sys.argv[1:2] == ["describe"]:  # the implementations and what runs here, not a measurement
        if sys.argv[2:]:
            print(f"attnbench: describe: unexpected argument {sys.argv[2]!r}; it takes none", file=sys.stderr)
            raise SystemExit(2)
        from .catalog import table

        print(table())
        return
    argv = [_normalise(a) for a in sys.argv[1:]]
    try:
        import hydra  # noqa: F401
    except ImportError:
        print(
            "attnbench: the command line needs hydra-core (pip install hydra-core); "
            "the Python API (attnbench.sweep.measure / sweep) works without it",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    register_schema()
    if not _NO_RUN.intersection(argv):
        planned: list[BenchConfig] = []
        err = precheck(argv, planned)
        if err:
            print(f"attnbench: {err}", file=sys.stderr)
            raise SystemExit(2)
        if planned:  # jobs that write row files: what they were asked for, for the merge
            from .merge import write_plan

            for path in write_plan(planned):
                print(f"plan: {path} ({len(planned)} configurations; python -m attnbench.merge lists what is missing)")
    sys.argv[1:] = argv
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # a launcher's errors reach main(), to be worded here
    try:
        hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base="1.3")(_task)()
        if _LOGGING:
            logging.config.dictConfig(_LOGGING)
        pending = dict(_PENDING)
        _PENDING.clear()
        _LOGGING.clear()
        for (resume, use_files), configs in pending.items():
            _run(configs, resume, use_files)
        if _FAILED:
            raise SystemExit(1)
    except KeyboardInterrupt:
        print(f"\nattnbench: interrupted; {_KEPT}", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        if type(e).__name__ != "UncompletedJobError":  # submitit's: a job ended without a result
            raise
        what = " ".join(str(e).split("Error stream produced")[0].split())
        print(
            f"attnbench: {what}. The other jobs' rows are in their row files: python -m attnbench.merge <study> "
            "merges them and lists what is missing, and the same command with resume=true measures it.",
            file=sys.stderr,
        )
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
