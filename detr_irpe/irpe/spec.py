"""The iRPE spec string ``rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}`` and its typed config."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

METHODS = ("euc", "quant", "cross", "product")
MODES = ("bias", "contextual")
MODE_ALIASES = {"bias": "bias", "ctx": "contextual", "contextual": "contextual"}
MAX_RATIO = 100.0

SPEC_HELP = (
    "expected 'rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}', e.g. 'rpe-2.0-product-ctx-1-k', where\n"
    "  ratio       > 0 (alpha = ratio, beta = 2*ratio, gamma = 8*ratio; product: 1.9 -> 49 buckets, 2.0 -> 81,"
    " 2.5 -> 121, 3.0 -> 169)\n"
    f"  method      one of {', '.join(METHODS)}\n"
    "  mode        ctx (contextual) or bias\n"
    "  shared_head 1 (one table shared by all heads) or 0 (a table per head)\n"
    "  rpe_on      any of q, k, v, e.g. k, qk, qkv"
)


@dataclass(frozen=True)
class RPEConfig:
    """What iRPE to attach to an attention layer.

    Attributes:
        ratio: controls the piecewise index function: alpha = ratio, beta = 2 ratio, gamma = 8 ratio.
        method: ``euc`` | ``quant`` | ``cross`` | ``product`` (how a 2D offset maps to a bucket).
        mode: ``bias`` (a learned scalar per bucket) or ``contextual`` (a learned vector per bucket).
        shared_head: one table shared by all heads (True) or one per head.
        rpe_on: which of queries / keys / values get an encoding, a subset of ``"qkv"``.
        skip: number of extra tokens (e.g. a class token) before the H*W image tokens; they share
            one extra bucket.
    """

    ratio: float = 2.0
    method: str = "product"
    mode: str = "contextual"
    shared_head: bool = True
    rpe_on: str = "k"
    skip: int = 0

    def __post_init__(self):
        problems = []
        if not isinstance(self.ratio, (int, float)) or not math.isfinite(self.ratio) or self.ratio <= 0:
            problems.append(f"ratio must be a finite number > 0, got {self.ratio!r}")
        elif self.ratio > MAX_RATIO:  # also keeps int(2 * ratio) finite
            problems.append(f"ratio must be <= {MAX_RATIO:g} (beyond that every offset of a feature map is its own "
                            f"bucket and the tables only grow), got {self.ratio!r}")
        elif int(2 * self.ratio) < 1:
            problems.append(f"ratio must be >= 0.5 so that beta = 2*ratio >= 1, got {self.ratio!r}")
        if self.method not in METHODS:
            problems.append(f"method must be one of {METHODS}, got {self.method!r}")
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.rpe_on or set(self.rpe_on) - set("qkv") or len(set(self.rpe_on)) != len(self.rpe_on):
            problems.append(f"rpe_on must be a non-empty subset of 'qkv' without repeats, got {self.rpe_on!r}")
        elif "v" in self.rpe_on and self.mode == "bias":
            problems.append("bias mode has no encoding on values (rpe_on contains 'v'); use ctx mode for values")
        if not isinstance(self.skip, int) or self.skip < 0:
            problems.append(f"skip must be an integer >= 0, got {self.skip!r}")
        if problems:
            raise ValueError("invalid iRPE config: " + "; ".join(problems))
        # canonical order q, k, v
        object.__setattr__(self, "rpe_on", "".join(c for c in "qkv" if c in self.rpe_on))

    @property
    def alpha(self) -> float:
        return 1.0 * self.ratio

    @property
    def beta(self) -> float:
        return 2.0 * self.ratio

    @property
    def gamma(self) -> float:
        return 8.0 * self.ratio

    @property
    def num_buckets(self) -> int:
        """Buckets of one lookup table (for ``cross``: of each of its row and column tables)."""
        return num_buckets(self.method, self.beta) + (1 if self.skip > 0 else 0)

    @property
    def spec(self) -> str:
        mode = "ctx" if self.mode == "contextual" else "bias"
        return f"rpe-{self.ratio!r}-{self.method}-{mode}-{int(self.shared_head)}-{self.rpe_on}"

    def __str__(self) -> str:
        return self.spec


def num_buckets(method: str, beta: float) -> int:
    """Number of buckets without skip tokens: product ``(2*int(beta)+1)**2``, others ``2*int(beta)+1``."""
    side = 2 * int(beta) + 1
    return side * side if method == "product" else side


def parse_rpe_spec(spec: str, skip: int = 0) -> RPEConfig:
    """Parse ``rpe-{ratio}-{method}-{mode}-{shared_head}-{rpe_on}`` into an :class:`RPEConfig`.

    Raises:
        ValueError: quoting the spec and showing the valid format and choices.
    """

    def fail(why: str) -> ValueError:
        return ValueError(f"malformed iRPE spec {spec!r}: {why}\n{SPEC_HELP}")

    if not isinstance(spec, str):
        raise fail(f"expected a string, got {type(spec).__name__}")
    parts = spec.strip().split("-")
    if len(parts) != 6:
        raise fail(f"expected 6 '-'-separated fields, got {len(parts)}")
    prefix, ratio_s, method, mode_s, shared_s, rpe_on = parts
    if prefix != "rpe":
        raise fail(f"must start with 'rpe-', got {prefix!r}")
    try:
        ratio = float(ratio_s)
    except ValueError:
        raise fail(f"ratio {ratio_s!r} is not a number") from None
    if not math.isfinite(ratio) or ratio < 0.5:
        raise fail(f"ratio must be a finite number >= 0.5, got {ratio_s!r}")
    if method not in METHODS:
        raise fail(f"unknown method {method!r}")
    if mode_s not in MODE_ALIASES:
        raise fail(f"unknown mode {mode_s!r}")
    if shared_s not in ("0", "1"):
        raise fail(f"shared_head must be 0 or 1, got {shared_s!r}")
    if not rpe_on or set(rpe_on) - set("qkv") or len(set(rpe_on)) != len(rpe_on):
        raise fail(f"rpe_on must be a non-empty combination of q, k, v, got {rpe_on!r}")
    try:
        return RPEConfig(ratio=ratio, method=method, mode=MODE_ALIASES[mode_s],
                         shared_head=shared_s == "1", rpe_on=rpe_on, skip=skip)
    except ValueError as e:
        raise fail(str(e)) from None


def as_rpe_config(rpe: Union[None, str, RPEConfig]) -> Optional[RPEConfig]:
    """Accept ``None`` / ``""`` (no iRPE), a spec string or an :class:`RPEConfig`."""
    if rpe is None or rpe == "" or (isinstance(rpe, str) and rpe.lower() == "none"):
        return None
    if isinstance(rpe, RPEConfig):
        return rpe
    if isinstance(rpe, str):
        return parse_rpe_spec(rpe)
    raise TypeError(f"rpe must be None, a spec string like 'rpe-2.0-product-ctx-1-k' or an RPEConfig, "
                    f"got {type(rpe).__name__}")
