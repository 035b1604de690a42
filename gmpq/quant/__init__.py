"""gmpq.quant: the one quantization backend (quantizers, quantized modules, policy file, cost, export)."""

from gmpq.quant.calibrate import calibrate, is_calibrated, require_calibrated
from gmpq.quant.cost import cost_summary, format_summary, measure_macs
from gmpq.quant.export import export_packed, load_packed, read_packed, theoretical_packed_bytes
from gmpq.quant.functional import ALLOWED_BITS, FULL_PRECISION
from gmpq.quant.modules import (
    LayerSpec,
    QConv2d,
    QLinear,
    is_quantizable,
    is_quantized,
    layer_specs,
    quantizable_layers,
    quantizers_disabled,
    register_quantizable,
    swap_layers,
)
from gmpq.quant.policy import (
    FORMAT,
    apply_policy,
    check_schema,
    layer_bits,
    load_policy,
    make_policy,
    policy_specs,
    resolve_policy,
    save_policy,
    uniform_policy,
    validate_policy,
)
from gmpq.quant.quantizers import ActQuantizer, WeightQuantizer

__all__ = [
    "ALLOWED_BITS", "FULL_PRECISION", "FORMAT", "ActQuantizer", "WeightQuantizer", "LayerSpec", "QConv2d", "QLinear",
    "apply_policy", "calibrate", "check_schema", "cost_summary", "export_packed", "format_summary", "is_calibrated",
    "is_quantizable", "is_quantized", "layer_bits", "layer_specs", "load_packed", "load_policy", "make_policy",
    "measure_macs", "policy_specs", "quantizable_layers", "quantizers_disabled", "read_packed", "register_quantizable",
    "require_calibrated", "resolve_policy", "save_policy", "swap_layers", "theoretical_packed_bytes", "uniform_policy",
    "validate_policy",
]
