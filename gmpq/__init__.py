"""gmpq: mixed-precision quantization of vision models.

Subpackages: ``gmpq.quant`` (the one quantization backend), ``gmpq.models`` (model registry),
``gmpq.data`` (datasets), ``gmpq.search`` (the GMPQ hypernet search).
"""

__version__ = "0.1.0"
