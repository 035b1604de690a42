"""Q-DETR-style quantization-aware training (``detr-ptq qat``): LSQ/LSQ+ quantized DETR with quantized attention,
distribution alignment and foreground-aware query-matching distillation from the full-precision model."""

from detr_ptq.qat.config import PARTS, QATConfig

__all__ = ["PARTS", "QATConfig"]
