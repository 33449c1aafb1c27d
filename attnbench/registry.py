"""The implementation registry.

Every module in the ``attnbench.impls`` package (the repository's ``impls/`` folder)
registers one implementation with :func:`register`; other packages add theirs through the entry-point group
``attnbench.impls``. Implementation modules are imported only when the registry is
first queried, and they import optional packages (triton, cupy, flash-attn,
transformers) inside their functions, so ``import attnbench`` needs torch alone.

An implementation is a function ``fn(q, k, v, pattern, scale) -> out`` with q and out
of shape ``(batch, heads, seq, head_dim)`` and k, v ``(batch, kv_heads, seq, head_dim)``
in one dtype and device, where ``kv_heads`` divides ``heads`` and query head ``h``
reads key/value head ``h // (heads // kv_heads)`` (grouped-query attention; multi-query
when ``kv_heads == 1``). An implementation registered with ``native_gqa=True`` reads
grouped k, v itself; for the others :meth:`Impl.call` repeats k and v per query head
before the call (inside it, so its memory shows in the measurement). An implementation
declaring the ``key_mask`` feature also takes ``key_mask=`` (``(batch, seq)`` bool, True
where the key is present); it is passed only when a call has one.
What it supports is data (:class:`Impl`); :meth:`Impl.not_supported_reasons` lists
every reason a call cannot run, and nothing falls back silently. What an
implementation chose for its last call (a block mask's build time, autotuned block
sizes) comes back through :attr:`Impl.report`, never through module globals.
"""

from __future__ import annotations

import importlib
import pkgutil
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .dtypes import dtype_name
from .layout import impls_package
from .ops import repeat_kv
from .pattern import Pattern
from .reference import default_scale

__all__ = [
    "FEATURES",
    "Impl",
    "UnsupportedError",
    "register",
    "get_impl",
    "list_impls",
    "describe",
    "attention",
    "required_features",
    "available_impls",
]

#: Features an implementation may declare. ``asymmetric_window``: a non-causal window
#: whose sides differ, ``(left, right)`` with ``left != right``; ``key_mask``: a per-sample
#: key mask on top of the pattern (``fn(..., key_mask=...)``, see :func:`attention`).
FEATURES = ("dilation", "per_head_dilation", "global_tokens", "causal", "asymmetric_window", "key_mask", "backward")

ImplFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Pattern, float], torch.Tensor]


class UnsupportedError(ValueError):
    """An implementation cannot run this call; ``reasons`` lists every reason."""

    def __init__(self, impl: str, reasons: list[str]):
        self.impl = impl
        self.reasons = list(reasons)
        super().__init__(f"impl={impl!r} cannot run this call: " + "; ".join(self.reasons))


@dataclass(frozen=True)
class Impl:
    """What an implementation is and what it can do.

    Attributes:
        name: registry key.
        fn: ``fn(q, k, v, pattern, scale) -> out``, shapes ``(B, H, n, D)``.
        devices: device types it runs on (``"cpu"``, ``"cuda"``).
        dtypes: input dtypes it accepts.
        features: subset of :data:`FEATURES`.
        probe: returns ``None`` when usable here, else the reason (missing package...).
        check: per-call extra reasons, ``check(q, pattern) -> list[str]`` (e.g. head_dim).
        memory: estimated peak bytes the call allocates beyond its inputs,
            ``memory(batch, heads, seq, head_dim, element_size, pattern, backward)``;
            used by the benchmark's memory guard.
        description: one line for ``describe()``.
        module: the module that registered it.
        tunables: default tunables (block sizes...), recorded with results.
        slow_on_cpu: runs interpreted or looped on the CPU; the test suite then uses
            its reduced (small) case list on the CPU.
        interpreted_on_cpu: on the CPU it runs in an interpreter (Triton's); the
            benchmark skips large sizes there unless asked.
        report: ``report() -> dict``, what the last call chose, for the result row:
            ``setup_ms`` (per-shape set-up it built and cached, e.g. a block mask; 0.0
            when it came from the cache) and ``tunables`` (e.g. autotuned block sizes).
        native_gqa: ``fn`` reads k, v with fewer heads than q itself; otherwise
            :meth:`call` repeats them per query head first.
        dense: computes every (query, key) score whatever the pattern, so its time
            grows as n^2 (otherwise as the pattern's pairs); the time guard's growth
            until a series has two measured points.
        unsupported_on: declared features a device type refuses, ``{device: {feature:
            reason}}`` (FlexAttention's backward on the CPU): refused before any call.
    """

    name: str
    fn: ImplFn
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    features: frozenset[str]
    probe: Callable[[], str | None] | None = None
    check: Callable[[torch.Tensor, Pattern], list[str]] | None = None
    memory: Callable[..., float] | None = None
    description: str = ""
    module: str = ""
    tunables: dict = field(default_factory=dict)
    slow_on_cpu: bool = False
    interpreted_on_cpu: bool = False
    report: Callable[[], dict] | None = None
    native_gqa: bool = False
    dense: bool = False
    unsupported_on: dict[str, dict[str, str]] = field(default_factory=dict)

    def call(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pattern: Pattern,
        scale: float,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``fn`` as every caller runs it: k, v ``(B, H_kv, n, D)`` repeated to q's heads
        first unless the implementation reads grouped heads natively; ``key_mask`` passed
        only when given. No checks: see :func:`attention` for the checked entry point."""
        if k.shape[1] != q.shape[1] and not self.native_gqa:
            k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        if key_mask is None:
            return self.fn(q, k, v, pattern, scale)
        return self.fn(q, k, v, pattern, scale, key_mask=key_mask)

    def estimate_memory(
        self, B: int, H: int, H_kv: int, n: int, D: int, esize: int, pattern: Pattern, backward: bool
    ) -> float | None:
        """The implementation's estimate of the bytes a call allocates beyond its inputs
        (None: it gives none), plus the repeated k, v (and their gradients) where
        :meth:`call` repeats them."""
        if self.memory is None:
            return None
        est = float(self.memory(B, H, n, D, esize, pattern, backward))
        if H_kv != H and not self.native_gqa:
            est += 2 * B * H * n * D * esize * (2 if backward else 1)
        return est

    def last_call(self) -> dict:
        """What the last call chose (:attr:`report`): ``setup_ms`` and ``tunables``
        where the implementation reports them; its declared tunables otherwise."""
        got = dict(self.report() or {}) if self.report is not None else {}
        got.setdefault("tunables", dict(self.tunables))
        return got

    def unavailable_reason(self) -> str | None:
        """Why it cannot run on this machine at all, or None."""
        if self.probe is None:
            return None
        try:
            return self.probe()
        except Exception as e:  # a broken probe is a reason, not a crash
            return f"availability probe failed: {type(e).__name__}: {e}"

    def not_supported_reasons(
        self,
        pattern: Pattern,
        *,
        device: str | torch.device,
        dtype: torch.dtype,
        backward: bool = False,
        q: torch.Tensor | None = None,
        key_mask: bool = False,
    ) -> list[str]:
        """Every reason this implementation cannot run the described call (empty: it can);
        ``key_mask``: the call has a key mask."""
        reasons: list[str] = []
        why = self.unavailable_reason()
        if why:
            reasons.append(why)
        dev = torch.device(device).type
        if dev not in self.devices:
            reasons.append(f"device {dev!r} not supported (supports {', '.join(self.devices)})")
        if dtype not in self.dtypes:
            names = ", ".join(dtype_name(t) for t in self.dtypes)
            reasons.append(f"dtype {dtype_name(dtype)} not supported (supports {names})")
        limits = self.unsupported_on.get(dev, {})
        for feat in required_features(pattern, backward=backward, key_mask=key_mask):
            if feat not in self.features:
                reasons.append(f"feature {feat!r} not supported")
            elif feat in limits:
                reasons.append(f"feature {feat!r} not supported on {dev}: {limits[feat]}")
        if q is not None and self.check is not None and not reasons:
            reasons.extend(self.check(q, pattern))
        return reasons


def required_features(pattern: Pattern, backward: bool = False, key_mask: bool = False) -> list[str]:
    """The features a call with this pattern needs (``key_mask``: and a key mask)."""
    need = []
    if pattern.per_head:
        if any(d != 1 for d in pattern.dilation):
            need.append("dilation")
        need.append("per_head_dilation")
    elif pattern.dilation != 1:
        need.append("dilation")
    if pattern.global_tokens:
        need.append("global_tokens")
    if pattern.causal:
        need.append("causal")
    elif pattern.left != pattern.right:
        need.append("asymmetric_window")
    if key_mask:
        need.append("key_mask")
    if backward:
        need.append("backward")
    return need


def _first_line(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0] if lines else ""


_REGISTRY: dict[str, Impl] = {}
_BROKEN: dict[str, str] = {}  # plugin module -> import error
_LOADED = False


def register(
    name: str,
    *,
    devices: Iterable[str] = ("cpu", "cuda"),
    dtypes: Iterable[torch.dtype] = (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    features: Iterable[str] = (),
    probe: Callable[[], str | None] | None = None,
    check: Callable[[torch.Tensor, Pattern], list[str]] | None = None,
    memory: Callable[..., float] | None = None,
    description: str = "",
    tunables: dict | None = None,
    slow_on_cpu: bool = False,
    interpreted_on_cpu: bool = False,
    report: Callable[[], dict] | None = None,
    native_gqa: bool = False,
    dense: bool = False,
    unsupported_on: dict[str, dict[str, str]] | None = None,
) -> Callable[[ImplFn], ImplFn]:
    """Decorator registering ``fn(q, k, v, pattern, scale) -> out`` under ``name``.

    ``features=FEATURES`` declares every feature; ``description`` defaults to the first
    line of ``fn``'s docstring. A duplicate name is an error; so is an unknown feature.
    """
    feats = frozenset(features)
    unsupported_on = {dev: dict(m) for dev, m in (unsupported_on or {}).items()}
    unknown = (feats | {f for m in unsupported_on.values() for f in m}) - set(FEATURES)
    if unknown:
        raise ValueError(f"register({name!r}): unknown feature(s) {sorted(unknown)}; allowed: {', '.join(FEATURES)}")

    def deco(fn: ImplFn) -> ImplFn:
        if name in _REGISTRY:
            raise ValueError(
                f"implementation {name!r} is already registered (by {_REGISTRY[name].module}); names must be unique"
            )
        _REGISTRY[name] = Impl(
            name=name,
            fn=fn,
            devices=tuple(devices),
            dtypes=tuple(dtypes),
            features=feats,
            probe=probe,
            check=check,
            memory=memory,
            description=description or _first_line(fn.__doc__),
            module=getattr(fn, "__module__", ""),
            tunables=dict(tunables or {}),
            slow_on_cpu=slow_on_cpu,
            interpreted_on_cpu=interpreted_on_cpu,
            report=report,
            native_gqa=native_gqa,
            dense=dense,
            unsupported_on=unsupported_on,
        )
        return fn

    return deco


def unregister(name: str) -> None:
    """Remove an implementation (used by tests that register throwaway ones)."""
    _REGISTRY.pop(name, None)


def _load_all() -> None:
    """Import the bundled ``attnbench.impls`` modules and the ``attnbench.impls`` entry
    points once. A module that fails to import is listed by :func:`describe`."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    impls = impls_package()

    for mod in sorted(pkgutil.iter_modules(impls.__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{impls.__name__}.{mod.name}")
        except Exception as e:
            _BROKEN[f"attnbench.impls.{mod.name}"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=2)}"
    from importlib.metadata import entry_points

    for ep in entry_points(group="attnbench.impls"):
        try:
            ep.load()
        except Exception as e:
            _BROKEN[f"entry point {ep.name}"] = f"{type(e).__name__}: {e}"


def list_impls() -> list[str]:
    """Names of every registered implementation (available here or not), sorted."""
    _load_all()
    return sorted(_REGISTRY)


def available_impls(device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> list[Impl]:
    """The implementations that run on this machine (their probe finds what they need),
    in :func:`list_impls` order; with ``device`` / ``dtype``, only those that declare it."""
    out = []
    for name in list_impls():
        im = _REGISTRY[name]
        if im.unavailable_reason() is not None:
            continue
        if device is not None and torch.device(device).type not in im.devices:
            continue
        if dtype is not None and dtype not in im.dtypes:
            continue
        out.append(im)
    return out


def get_impl(name: str) -> Impl:
    """The registry entry for ``name``; a clear error listing the choices otherwise."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        choices = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"impl={name!r}: unknown implementation; choose one of: {choices}") from None


def _caveats(im: Impl) -> list[str]:
    """What an available implementation cannot do everywhere, from its declared data."""
    out = [f"{dev}: no {feat}: {why}" for dev, limits in im.unsupported_on.items() for feat, why in limits.items()]
    if im.interpreted_on_cpu and "cpu" in im.devices:
        out.append(
            "cpu: runs only in Triton's interpreter (TRITON_INTERPRET=1), for tests: sizes over "
            "interpreter_max_seq are skipped unless allow_slow=true"
        )
    return out


def describe() -> list[dict]:
    """One dict per implementation: name, available (or why not), devices, dtypes,
    features, and its caveats (a list: what a device refuses or runs only slowly).

    ``attnbench.describe()`` pretty-prints nothing: turn it into a DataFrame or use
    ``python -m attnbench describe``.
    """
    _load_all()
    rows = []
    for name in sorted(_REGISTRY):
        im = _REGISTRY[name]
        why = im.unavailable_reason()
        rows.append(
            {
                "name": name,
                "available": why is None,
                "reason": why or "",
                "devices": ",".join(im.devices),
                "dtypes": ",".join(dtype_name(t) for t in im.dtypes),
                "features": ",".join(f for f in FEATURES if f in im.features),
                "gqa": "native" if im.native_gqa else "repeats k, v",
                "caveats": _caveats(im),
                "description": im.description,
            }
        )
    for mod, err in _BROKEN.items():
        rows.append(
            {
                "name": mod,
                "available": False,
                "reason": "failed to import: " + err.splitlines()[0],
                "devices": "",
                "dtypes": "",
                "features": "",
                "gqa": "",
                "caveats": [],
                "description": "",
            }
        )
    return rows


def validate_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, key_mask: torch.Tensor | None = None
) -> None:
    """Shape, dtype and device checks shared by every entry point."""
    if not isinstance(pattern, Pattern):
        raise ValueError(f"pattern: expected attnbench.Pattern, got {type(pattern).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating dtype (fp64, fp32, fp16, bf16), got {t.dtype}")
    B, H, n, D = q.shape
    H_kv = k.shape[1]
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != q.shape[2:] or H_kv < 1 or H % H_kv:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: q must be (batch, heads, seq, head_dim) "
            "and k, v both (batch, kv_heads, seq, head_dim) with kv_heads dividing heads"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have the same dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on the same device; got {q.device}, {k.device}, {v.device}")
    if B < 1 or H < 1 or n < 1 or D < 1:
        raise ValueError(f"q: every dimension must be >= 1, got shape {tuple(q.shape)}")
    pattern.validate(n, H)
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool or key_mask.shape != (B, n):
            got = f"{tuple(key_mask.shape)} {key_mask.dtype}" if isinstance(key_mask, torch.Tensor) else key_mask
            raise ValueError(f"key_mask: expected a bool tensor (batch, seq) = {(B, n)}, True where the key is "
                             f"present; got {got}")  # fmt: skip
        if key_mask.device != q.device:
            raise ValueError(f"key_mask must be on q's device {q.device}; got {key_mask.device}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    impl: str = "chunked",
    scale: float | None = None,
    *,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sliding-window attention with the named implementation.

    Args:
        q: ``(batch, heads, seq, head_dim)``; k, v: ``(batch, kv_heads, seq, head_dim)``
            with ``kv_heads`` dividing ``heads`` (query head h reads key/value head
            ``h // (heads // kv_heads)``); one dtype and device.
        pattern: the :class:`Pattern`.
        impl: a name from :func:`list_impls`.
        scale: softmax scale, ``1/sqrt(head_dim)`` by default.
        key_mask: ``(batch, seq)`` bool, True where key j of sample b is present (a
            padding mask, holes anywhere), on top of the pattern; a row left without
            keys is 0. Needs the ``key_mask`` feature.
    Returns:
        ``(batch, heads, seq, head_dim)`` in the input dtype.
    Raises:
        ValueError: bad inputs; :class:`UnsupportedError` listing every reason the
            implementation cannot run this call (it never falls back to another).
    """
    validate_inputs(q, k, v, pattern, key_mask)
    im = get_impl(impl)
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    reasons = im.not_supported_reasons(
        pattern, device=q.device, dtype=q.dtype, backward=backward, q=q, key_mask=key_mask is not None
    )
    if reasons:
        raise UnsupportedError(impl, reasons)
    out = im.call(q, k, v, pattern, default_scale(q.shape[-1], scale), key_mask)
    if out.shape != q.shape or out.dtype != q.dtype:  # a contract, enforced for plugins too
        raise RuntimeError(
            f"impl={impl!r} returned shape {tuple(out.shape)} dtype {out.dtype}; expected {tuple(q.shape)} {q.dtype}"
        )
    return out
