"""detr_ptq: DETR quantization on the gmpq.quant backend.

Output-sensitivity Hessian mixed-precision PTQ (Hutchinson traces + ILP) and Q-DETR-style QAT.
"""
