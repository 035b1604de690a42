"""Model registry. Importing this package registers every model.

    from gmpq.models import create_model, list_models, model_spec
"""

from gmpq.data.stats import IMAGENET_MEAN, IMAGENET_STD
from gmpq.models import cifar_resnet, imagenet, small_cnn  # noqa: F401  (registration side effects)
from gmpq.models.registry import (
    ModelSpec,
    create_model,
    list_models,
    model_spec,
    register_model,
)
from gmpq.models.search_variants import create_search_model, has_search_variant, is_search_variant
from gmpq.models.weights import load_weights

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ModelSpec", "create_model", "create_search_model", "has_search_variant",
           "is_search_variant", "list_models", "load_weights", "model_spec", "register_model"]
