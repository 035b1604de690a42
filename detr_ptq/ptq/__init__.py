"""Output-sensitivity Hessian mixed-precision PTQ for DETR: Hutchinson traces of three losses per layer, an ILP
over per-layer weight bit-widths, and weight-only PTQ through ``gmpq.quant`` (see docs/ptq.md).

    sensitivity.py  traces per layer and metric (loss, output-float, output-quant)   -> sensitivity.json
    allocate.py     Omega table + ilp.py (scipy milp / HiGHS)                         -> policy.json
    apply.py        apply a policy / uniform bits and evaluate COCO AP
    table.py        the paper's Table 1 on one detector
"""
