"""Fixed-point types for the FPGA target: parse ``ap_fixed<W,I[,Q,O]>`` and fit it to layers.

A signed ``ap_fixed<W,I>`` (Xilinx Vitis HLS arbitrary precision types, UG1399) has W bits,
I of them integer bits including the sign, so it represents

    [-2^(I-1), 2^(I-1) - 2^-(W-I)]   in steps of 2^-(W-I).

One global type is a poor fit for a network whose layers have very different ranges: too few
integer bits and the largest activations overflow (with the default AP_WRAP they wrap around,
silently); too many and the small ones lose their fractional bits. So each layer's output
type keeps the user's total width W (and rounding/overflow modes) and gets just enough
integer bits for the largest |activation| seen on calibration data (docs/toolchain.md, "FPGA-adjacent").
Weights and biases keep the user's type. Only :func:`activation_ranges` and
:func:`hls_config` import hls4ml (lazily); the rest is pure.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from kdens.errors import ConfigError

DEFAULT_PRECISION = "ap_fixed<16,6>"
"""hls4ml's default type: 99.75% top-1 agreement on a 784-800-800-10 MLP (docs/toolchain.md)."""
ROUNDING = ("TRN", "TRN_ZERO", "RND", "RND_ZERO", "RND_INF", "RND_MIN_INF", "RND_CONV")
"""Quantization (rounding) modes hls4ml's C simulation supports; ``TRN`` is ap_fixed's default."""
OVERFLOW = ("WRAP", "SAT", "SAT_ZERO", "SAT_SYM")
"""Overflow modes hls4ml supports; ``WRAP`` is ap_fixed's default (and silently wraps around)."""
MAX_WIDTH = 64
"""Widest total width accepted: wider types only cost area and are never needed for inference."""

_EXAMPLE = "e.g. --precision 'ap_fixed<16,6>' or 'ap_fixed<8,3,AP_RND_CONV,AP_SAT>'"
_PATTERN = re.compile(r"^ap_fixed<\s*(-?\d+)\s*,\s*(-?\d+)\s*(?:,\s*(\w+)\s*)?(?:,\s*(\w+)\s*)?>$")


@dataclass(frozen=True)
class FixedType:
    """A signed Xilinx ``ap_fixed<width, integer, rounding, overflow>`` type."""

    width: int
    """Total bits W, sign included."""
    integer: int
    """Integer bits I, sign included; W - I bits are fractional."""
    rounding: str = "TRN"
    """Quantization mode without the ``AP_`` prefix (one of ROUNDING)."""
    overflow: str = "WRAP"
    """Overflow mode without the ``AP_`` prefix (one of OVERFLOW)."""

    def __str__(self) -> str:
        if (self.rounding, self.overflow) == ("TRN", "WRAP"):
            return f"ap_fixed<{self.width},{self.integer}>"
        return f"ap_fixed<{self.width},{self.integer},AP_{self.rounding},AP_{self.overflow}>"

    @property
    def lsb(self) -> float:
        """Step between neighbouring values, 2^-(W-I)."""
        return 2.0 ** -(self.width - self.integer)

    @property
    def max_value(self) -> float:
        """Largest representable value, 2^(I-1) - lsb."""
        return 2.0 ** (self.integer - 1) - self.lsb

    @property
    def tag(self) -> str:
        """File-name friendly form: ``ap_fixed16_6`` or ``ap_fixed8_3_rnd_conv_sat``."""
        base = f"ap_fixed{self.width}_{self.integer}"
        if (self.rounding, self.overflow) == ("TRN", "WRAP"):
            return base
        return f"{base}_{self.rounding.lower()}_{self.overflow.lower()}"

    def with_integer(self, integer: int) -> "FixedType":
        """Same width and modes, different integer bits."""
        return FixedType(self.width, integer, self.rounding, self.overflow)


def _mode(text: str, valid: tuple[str, ...], what: str, precision: str) -> str:
    mode = text.upper().removeprefix("AP_")
    if mode not in valid:
        raise ConfigError(
            f"--precision {precision!r}: {what} mode {text!r} is not supported; valid: "
            f"{', '.join('AP_' + v for v in valid)} ({_EXAMPLE})"
        )
    return mode


def parse_precision(text: str) -> FixedType:
    """Parse ``ap_fixed<W,I>``, ``ap_fixed<W,I,Q>`` or ``ap_fixed<W,I,Q,O>``.

    Args:
        text: The ``--precision`` value. Modes may be written with or without ``AP_``.

    Returns:
        The parsed type; rounding defaults to TRN and overflow to WRAP as in ap_fixed.

    Raises:
        ConfigError: Not an ``ap_fixed`` string, 2 <= W <= 64 or 1 <= I <= W violated, or
            an unknown mode. The message names ``--precision`` and gives an example.
    """
    if not isinstance(text, str):
        raise ConfigError(f"--precision {text!r} must be a string ({_EXAMPLE})")
    m = _PATTERN.match(text.strip().replace(" ", ""))
    if m is None:
        raise ConfigError(f"--precision {text!r} is not an ap_fixed type ({_EXAMPLE})")
    width, integer = int(m.group(1)), int(m.group(2))
    if not 2 <= width <= MAX_WIDTH:
        raise ConfigError(f"--precision {text!r}: width W={width} must be in [2, {MAX_WIDTH}] ({_EXAMPLE})")
    if not 1 <= integer <= width:
        raise ConfigError(
            f"--precision {text!r}: integer bits I={integer} must be in [1, W={width}] "
            f"(I counts the sign bit) ({_EXAMPLE})"
        )
    rounding = _mode(m.group(3), ROUNDING, "rounding", text) if m.group(3) else "TRN"
    overflow = _mode(m.group(4), OVERFLOW, "overflow", text) if m.group(4) else "WRAP"
    return FixedType(width, integer, rounding, overflow)


def integer_bits_for(max_abs: float, width: int) -> int:
    """Fewest integer bits I (sign included, 1 <= I <= W) with max_abs <= 2^(I-1) - 2^-(W-I).

    Values beyond the widest type ``ap_fixed<W,W>`` cannot be held; the caller sees I == W
    and the range check in :func:`choose_layer_precision` flags it.
    """
    if not math.isfinite(max_abs):
        raise ConfigError(f"activation range {max_abs} is not finite: the model produces inf/NaN")
    if max_abs <= 0.0:
        return 1
    integer = max(1, math.floor(math.log2(max_abs)) + 2)  # 2^(I-1) > max_abs
    while integer < width and max_abs > FixedType(width, integer).max_value:
        integer += 1  # the last lsb below 2^(I-1) may be missing
    return min(integer, width)


def choose_layer_precision(ranges: dict[str, float], default: FixedType, headroom_bits: int = 1,
                           exact: frozenset[str] = frozenset()) -> dict[str, dict]:
    """Per-layer output types from observed ranges, keeping the user's width and modes.

    Integer bits are the fewest that hold the calibration range, plus ``headroom_bits``
    guard bits: test inputs exceed the calibration maximum now and then (measured here: a
    CNN's logits reached 36 on test data after 31 on calibration data), and with AP_WRAP
    one such overflow flips the sign of a logit.

    Args:
        ranges: Largest |output| of each layer on calibration data, by layer name.
        default: The user's type.
        headroom_bits: Extra integer bits above the calibration range (each halves the
            resolution and doubles the range).
        exact: Layers whose range is known, not estimated (the input: images in [0, 1]),
            which get no headroom.

    Returns:
        ``{layer: {"type": str, "max_abs": float, "fits": bool}}``; ``fits`` is False when
        even ``ap_fixed<W,W>`` cannot hold the calibration range (then the overflow mode
        decides what happens, and the parity check against PyTorch will show it).
    """
    if headroom_bits < 0:
        raise ConfigError(f"headroom_bits={headroom_bits} must be >= 0, e.g. 1")
    out = {}
    for name, max_abs in ranges.items():
        extra = 0 if name in exact else headroom_bits
        integer = min(default.width, integer_bits_for(float(max_abs), default.width) + extra)
        t = default.with_integer(integer)
        out[name] = {"type": str(t), "max_abs": float(max_abs), "fits": float(max_abs) <= t.max_value}
    return out


def parse_sweep(value) -> list[tuple[int, int]]:
    """Fixed-point widths to sweep: ``"16,6;12,4"`` (the flag) or ``[[16, 6], [12, 4]]`` (TOML) -> W,I pairs."""
    items = value.split(";") if isinstance(value, str) else value
    try:
        pairs = [tuple(int(v) for v in (p.split(",") if isinstance(p, str) else p))
                 for p in items if (p.strip() if isinstance(p, str) else p)]
    except (TypeError, ValueError):
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ConfigError(f"--sweep {value!r} must be W,I pairs separated by ';', e.g. '16,6;12,4;8,3' "
                          "(in a pipeline file also [[16, 6], [12, 4]])")
    return pairs  # type: ignore[return-value]


def default_widths() -> list[tuple[int, int]]:
    """(W, I) pairs the precision sweep tries by default, widest first."""
    return [(16, 6), (12, 4), (10, 4), (8, 3), (6, 2)]


@torch.no_grad()
def activation_ranges(gm: torch.nn.Module, x: np.ndarray, batch_size: int = 512) -> dict[str, float]:
    """Largest |output| of every graph node on ``x``, by node name (= hls4ml layer name).

    The input placeholder is included, so the input type is fitted too.
    """
    from hls4ml.utils.torch import CustomFXTracer

    # hls4ml re-traces the module it is given; trace it the same way so names match exactly
    traced = torch.fx.GraphModule(gm, CustomFXTracer().trace(gm))
    ranges: dict[str, float] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
                ranges[n.name] = max(ranges.get(n.name, 0.0), float(out.abs().max()))
            return out

    for i in range(0, len(x), batch_size):
        _Recorder(traced).run(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])))
    return ranges


def hls_config(gm: torch.fx.GraphModule, input_shape: tuple[int, ...], ptype: FixedType, ranges: dict[str, float],
               backend: str, headroom_bits: int = 1) -> tuple[dict, dict[str, dict]]:
    """hls4ml config with per-layer output types; weights and biases keep ``ptype``.

    Accumulators stay ``auto`` (hls4ml sizes them so that the dot products are exact).
    ``channels_last_conversion='full'``: with 'off' hls4ml does not transpose Linear weights
    and silently gets ~9% agreement (docs/toolchain.md).

    Returns:
        The config and the chosen ``{layer: {"type", "max_abs", "fits"}}``.
    """
    import hls4ml

    cfg = hls4ml.utils.config_from_pytorch_model(
        gm, (None, *input_shape), granularity="name", backend=backend,
        default_precision=str(ptype), channels_last_conversion="full")
    layers = cfg["LayerName"]
    inputs = frozenset(n.name for n in gm.graph.nodes if n.op == "placeholder")
    # inputs are images in [0, 1] (DeployData's contract): the range is known, so no headroom,
    # but 1.0 must fit even when the calibration sample never reaches it
    ranges = {k: max(v, 1.0) if k in inputs else v for k, v in ranges.items() if k in layers}
    chosen = choose_layer_precision(ranges, ptype, headroom_bits, exact=inputs)
    for name, layer in layers.items():
        prec = layer.setdefault("Precision", {})
        for key in ("weight", "bias"):
            if key in prec:
                prec[key] = str(ptype)
        if name in chosen:
            prec["result"] = chosen[name]["type"]
    return cfg, chosen
