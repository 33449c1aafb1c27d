"""The configuration schema: one dataclass for the command line (Hydra's structured
config) and the Python API, validated in one place before anything runs.

Shape convention: q, k, v are ``(batch, heads, seq_len, head_dim)``. Fields left
``None`` or ``"auto"`` are filled in for the machine by :meth:`BenchConfig.resolved`.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .dtypes import DTYPES, parse_dtype
from .pattern import Pattern

__all__ = ["BenchConfig", "RunConfig", "SETTINGS", "MODES", "DEVICES", "MODELS", "setting_error", "device_tag"]

MODES = ("fwd", "bwd", "fwd_bwd")
#: the model families a measurement can run inside (attnbench.model), and their labels
MODELS = {"longformer": "longformer-base-shaped", "modernbert": "modernbert-base-shaped",
          "mistral": "mistral-7b-shaped"}  # fmt: skip
DEVICES = ("auto", "cpu", "cuda")
#: the figure a run draws at its end (attnbench.plot); auto: decided from the study's rows
FIGURES = ("auto", "none", "scaling", "model", "breakdown")
MAX_SEQ_LEN = 2**31 - 1
ISOLATE = ("auto", "true", "false")


@dataclass
class BenchConfig:
    """One measurement."""

    impl: str = "chunked"  # a name from attnbench.list_impls()
    seq_len: int | None = None  # None: 16384 on CUDA, 4096 on the CPU
    window: Any = 512  # neighbours per query besides itself (w/2 a side; (w, 0) causal), or [left, right]
    dilation: Any = 1  # int >= 1, or one int per head
    global_tokens: Any = field(default_factory=list)  # positions (one int: one position)
    causal: bool = False
    batch: int = 1
    heads: int = 12
    kv_heads: int | None = None  # key/value heads, dividing heads (grouped-query attention); None: heads
    head_dim: int = 64
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on the CPU
    device: str = "auto"  # auto: cuda when present
    mode: str = "fwd"  # fwd, bwd (backward only) or fwd_bwd
    seed: int = 0
    study: str = "default"  # results/<study>.csv; "{device}" becomes cpu or cuda-<gpu>
    results_dir: str = "results"
    # verification
    verify: bool = True
    exact_verify_bytes: float = 2**30  # the dense reference up to this size, else sampled rows
    verify_rows: int = 32
    grad_check_seq_len: int = 256  # model=...: the patched model is checked on this many tokens
    # timing
    time_budget_s: float = 2.0  # timed calls stop after this long ...
    min_reps: int = 3
    max_reps: int = 100  # ... or this many calls
    warmup: int = 1
    # each configuration measured in this many fresh processes, interleaved with the other
    # configurations it is compared with; the row's interval comes from them (1: from its calls)
    repeats: int = 1
    threads: int | None = None  # CPU threads; None: torch's default
    flush_l2: bool = True
    # guards
    memory: bool = True  # measure peak memory
    mem_budget_gb: float | None = None  # None: mem_budget_fraction of free memory
    mem_budget_fraction: float = 0.6
    job_timeout_s: float = 900.0  # a job running longer is stopped: skipped (time budget)
    interpreter_max_seq: int = 256  # Triton's interpreter on the CPU: larger n is skipped ...
    allow_slow: bool = False  # ... unless allowed
    isolate: Any = "auto"  # a child process per job: auto (= true), true or false
    profile: bool = False  # one more call under torch.profiler: results/profiles/<study>/...
    model_layers: int = 0  # 0: the attention call alone; L: inside an L-layer model (attnbench.model)
    model: str = "longformer"  # the model family model_layers builds: longformer, modernbert, mistral
    figure: str = "auto"  # drawn from the study's table at the run's end: auto, none, scaling, model, breakdown

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):  # dtype names are case-insensitive: FP32 is fp32
            self.dtype = self.dtype.lower()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting, its value and what is allowed."""
        for f in dataclasses.fields(self):
            _RULES[f.name](f.name, getattr(self, f.name))
        if self.max_reps < self.min_reps:
            raise ValueError(f"max_reps={self.max_reps!r}: must be >= min_reps={self.min_reps}")
        if self.model_layers and self.model != "longformer":
            p = self.pattern()
            ok = {"modernbert": not p.causal and p.left == p.right, "mistral": p.causal}[self.model]
            if not ok or p.dilation != 1 or p.global_tokens:
                raise ValueError(
                    f"model={self.model!r}: its sliding layers have "
                    + ("a symmetric window, not causal" if self.model == "modernbert" else "a causal window")
                    + f", no dilation and no global tokens; got {p.describe()}"
                )
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(
                f"kv_heads={self.kv_heads!r}: must divide heads={self.heads} "
                "(each key/value head serves heads / kv_heads query heads)"
            )
        from .registry import get_impl

        get_impl(self.impl)  # unknown: ValueError naming the choices
        p = self.pattern()  # ValueError naming the pattern field
        if self.seq_len is not None:
            p.validate(self.seq_len, self.heads)
        else:
            p.validate(max(p.global_tokens, default=0) + 1, self.heads)

    def resolved(self) -> BenchConfig:
        """A validated copy with the machine's choices filled in: device, dtype,
        seq_len, ``{device}`` in the study name, isolate as a bool."""
        self.validate()
        c = dataclasses.replace(self)
        if c.device == "auto":
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        elif c.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "device='cuda': no CUDA device here (torch.cuda.is_available() is False); choose auto or cpu"
            )
        c.dtype = ("bf16" if c.device == "cuda" else "fp32") if c.dtype == "auto" else parse_dtype(c.dtype)
        if c.seq_len is None:
            c.seq_len = 16384 if c.device == "cuda" else 4096
            c.pattern().validate(c.seq_len, c.heads)
        c.study = c.study.replace("{device}", device_tag(c.device))
        c.kv_heads = c.heads if c.kv_heads is None else c.kv_heads
        c.isolate = str(c.isolate).lower() != "false"
        p = c.pattern()
        c.window = list(p.window) if isinstance(p.window, tuple) else p.window  # the shortest form
        c.dilation, c.global_tokens = p.dilation, list(p.global_tokens)
        return c

    # ------------------------------------------------------------------ views
    def pattern(self) -> Pattern:
        d = self.dilation
        if isinstance(d, (list, tuple)) and len(d) == 1:
            d = d[0]  # one entry: every head
        w = tuple(self.window) if isinstance(self.window, list) else self.window
        return Pattern(w, tuple(d) if isinstance(d, list) else d, self.causal, self.global_tokens)

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[parse_dtype(self.dtype)]

    @classmethod
    def from_dict(cls, d: Mapping) -> BenchConfig:
        """From a mapping of field names (e.g. a composed Hydra config); an unknown key
        is a ``ValueError`` listing the settings."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown setting; the settings are: {', '.join(SETTINGS)}")
        return cls(**d)


@dataclass
class RunConfig(BenchConfig):
    """The command line's settings: one measurement plus how a run goes about it."""

    resume: bool = False  # skip what the results table (or its row files) already holds
    row_files: Any = "auto"  # a file per row in <results_dir>/<study>.rows/; auto: under submitit
    # an internal sweep: field -> list of values, crossed (impl: all = every available one)
    sweep: dict[str, Any] = field(default_factory=dict)


#: every setting of the command line, in the schema's order
SETTINGS = [f.name for f in dataclasses.fields(RunConfig)]


def device_tag(device: str) -> str:
    """``cpu`` or ``cuda-<gpu name>`` (e.g. ``cuda-h100-80gb-hbm3``), for study names."""
    if device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower().replace("nvidia", "").strip()
        return "cuda-" + "-".join(name.split())
    return "cpu"


# ---------------------------------------------------------------------- rules
def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int(low: int, optional: bool = False, high: int | None = None, why: str = "") -> Callable[[str, object], None]:
    def rule(name: str, v: object) -> None:
        if optional and v is None:
            return
        if not _is_int(v) or v < low or (high is not None and v > high):
            extra = " or null" if optional else ""
            span = f">= {low}" if high is None else f"from {low} to {high}{why}"
            raise ValueError(f"{name}={v!r}: must be an int {span}{extra}")

    return rule


def _number(low: float, *, strict: bool, high: float | None = None, optional: bool = False):
    def rule(name: str, v: object) -> None:
        if optional and v is None:
            return
        ok = _is_number(v) and (v > low if strict else v >= low) and (high is None or v <= high)
        if not ok:
            rng = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise ValueError(f"{name}={v!r}: must be a number {rng}" + (" or null" if optional else ""))

    return rule


def _bool(name: str, v: object) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name}={v!r}: must be true or false")


def _choice(choices: tuple[str, ...]):
    def rule(name: str, v: object) -> None:
        if (str(v).lower() if isinstance(v, bool) else v) not in choices:
            raise ValueError(f"{name}={v!r}: unknown; choose one of: {', '.join(choices)}")

    return rule


def _dtype(name: str, v: object) -> None:
    if v != "auto":
        try:
            parse_dtype(v)
        except ValueError:
            raise ValueError(f"{name}={v!r}: unknown; choose one of: auto, {', '.join(DTYPES)}") from None


def _str(pattern: str, what: str):
    def rule(name: str, v: object) -> None:
        if not isinstance(v, str) or not re.fullmatch(pattern, v):
            raise ValueError(f"{name}={v!r}: must be {what}")

    return rule


def _any(name: str, v: object) -> None:  # checked by Pattern (window, dilation, global tokens)
    pass


_RULES: dict[str, Callable[[str, Any], None]] = {
    "impl": _str(r".+", "an implementation name (python -m attnbench describe lists them)"),
    "seq_len": _int(1, optional=True, high=MAX_SEQ_LEN, why=" (2^31 - 1: kernels index positions in 32 bits)"),
    "window": _any,
    "dilation": _any,
    "global_tokens": _any,
    "causal": _bool,
    "batch": _int(1),
    "heads": _int(1),
    "kv_heads": _int(1, optional=True),
    "head_dim": _int(1),
    "dtype": _dtype,
    "device": _choice(DEVICES),
    "mode": _choice(MODES),
    "seed": _int(0),
    # a visible file name: not empty, not . or .., no path separator, no leading dot
    "study": _str(
        r"[^./\\][^/\\]*",
        "a file name: not empty, no '/' or '\\', not starting with '.' (results_dir= sets the folder)",
    ),
    "results_dir": _str(r".+", "a folder path"),
    "verify": _bool,
    "exact_verify_bytes": _number(0, strict=False),
    "verify_rows": _int(0),
    "grad_check_seq_len": _int(1),
    "time_budget_s": _number(0, strict=False),
    "min_reps": _int(1),
    "max_reps": _int(1),
    "warmup": _int(0),
    "repeats": _int(1, high=100, why=""),
    "threads": _int(1, optional=True),
    "flush_l2": _bool,
    "memory": _bool,
    "mem_budget_gb": _number(0, strict=True, optional=True),
    "mem_budget_fraction": _number(0, strict=True, high=1.0),
    "job_timeout_s": _number(0, strict=True),
    "interpreter_max_seq": _int(1),
    "allow_slow": _bool,
    "isolate": _choice(ISOLATE),
    "profile": _bool,
    "model_layers": _int(0),
    "model": _choice(tuple(MODELS)),
    "figure": _choice(FIGURES),
    "resume": _bool,
    "row_files": _choice(ISOLATE),
    "sweep": _any,
}


def setting_error(name: str, value: object) -> str | None:
    """The one-line message for ``name=value`` if its rule refuses it (None if it passes
    or ``name`` is not a setting). The command line uses it to word type errors."""
    rule = _RULES.get(name)
    if rule is None:
        return None
    try:
        rule(name, value)
    except ValueError as e:
        return str(e)
    return None
