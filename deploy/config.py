"""The deploy stage's typed config: which model, which target and precision, and the options."""

from __future__ import annotations

from dataclasses import dataclass, field

from deploy.common import DeployOptions
from deploy.fpga_precision import parse_precision, parse_sweep
from kdens.errors import ConfigError

TARGETS = ("onnx", "tflite", "fpga")
DEFAULT_FPGA_PRECISION = "ap_fixed<16,6>"


@dataclass
class DeployConfig:
    """One export: ``kdens deploy`` (or a ``[deploy]`` target of a pipeline file)."""

    model: str
    """--model: a finished generalist or student run folder."""
    target: str = "onnx"
    """--target: onnx, tflite or fpga."""
    precision: str | None = None
    """--precision: fpga fixed-point type (default ap_fixed<16,6>); onnx/tflite use opts.quantize."""
    sweep: list | None = None
    """--sweep: fpga only, (width, integer bits) pairs also reported."""
    min_agreement: float | None = None
    """--min-agreement: fpga only, fail below this top-1 agreement of the C simulation with PyTorch."""
    opts: DeployOptions = field(default_factory=DeployOptions)
    """Quantization, measurements and budgets (the remaining flags)."""

    def __post_init__(self) -> None:
        self.model = str(self.model)
        if isinstance(self.opts, dict):  # a pipeline file's keys, or a manifest's recorded config
            self.opts = DeployOptions(**self.opts)
        self.sweep = [list(p) for p in parse_sweep(self.sweep)] if self.sweep else None
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r} (--target); valid: {', '.join(TARGETS)}")
        if (self.precision is not None or self.sweep or self.min_agreement is not None) and self.target != "fpga":
            raise ConfigError("--precision, --sweep and --min-agreement apply to --target fpga only; "
                              "use --quantize for onnx/tflite")
        if self.target == "fpga" and self.opts.quantize != "none":
            raise ConfigError("--quantize applies to onnx/tflite; for --target fpga choose --precision ap_fixed<W,I>")
        if self.target == "fpga":
            parse_precision(self.precision or DEFAULT_FPGA_PRECISION)  # refuse a bad type before any work

    def precision_tag(self) -> str:
        """Folder-name precision: float / int8 / dynamic (tflite int8 I/O: int8-int8io), or ap_fixed16_6."""
        return precision_tag(self.target, self.opts, self.precision)

    def folder_name(self) -> str:
        """``<target>-<precision>``: the export's folder inside a deploy folder."""
        return f"{self.target}-{self.precision_tag()}"


def precision_tag(target: str, opts: DeployOptions, precision: str | None) -> str:
    """Folder-name precision: float / int8 / dynamic, or ap_fixed16_6 for FPGA types."""
    if target == "fpga":
        return parse_precision(precision or DEFAULT_FPGA_PRECISION).tag
    tag = {"none": "float", "int8": "int8", "dynamic": "dynamic"}[opts.quantize]
    # int8 in/out is a different file from float I/O around int8: keep both side by side
    return tag + "-int8io" if target == "tflite" and opts.io == "int8" else tag
