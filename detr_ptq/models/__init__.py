"""DETR model pieces, one concept per file; ``build_detr(cfg) -> (model, criterion, postprocessors)``."""

from detr_ptq.models.build import DETR_PRESETS, DETRConfig, build_detr, get_preset

__all__ = ["DETR_PRESETS", "DETRConfig", "build_detr", "get_preset"]

# Importing the models registers the quantizable DETR attention with gmpq.quant (register_quantizable).
from detr_ptq.models import qattention  # noqa: E402,F401
