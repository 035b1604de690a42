"""Attribution as a product feature: Grad-CAM (captum's ``LayerGradCam``) of a float and a quantized model, the
Attribution Rank Distance between them (GMPQ paper, Fig. 1b) and a PNG grid of overlays.

    gmpq attribution --model resnet20 --weights W.th --policy P.json --data cifar10_npz --out runs/attr

Modules: ``ard`` (the distance, pure), ``cam`` (captum Grad-CAM), ``run`` (``run_attribution(cfg) -> result``,
the grid), ``cli``.
"""
