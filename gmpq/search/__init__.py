"""GMPQ search (Wang et al., ICCV 2021): a compositional mixed-precision hypernet trained with cross-entropy, a BOPs
complexity loss and the capacity-aware attribution-rank loss; it exports a policy file.

    from gmpq.config import load_config
    from gmpq.search.config import SearchConfig
    from gmpq.search.train import run_search
    run_search(load_config(SearchConfig, "recipes/quickstart.yaml"))

Modules: ``mixed`` (mixed layers), ``hypernet`` (build from a model), ``gradcam``, ``losses``, ``train`` (the loop),
``setup`` (teacher and hypernet, search-time variants), ``export`` (policy, costs and chart), ``derive``
(budget-exact policies, ILP), ``probe`` (per-term gradient norms on the importance logits), ``cli``.
"""
