"""Deploy a policy: quantization-aware fine-tuning, evaluation, comparison reports."""
