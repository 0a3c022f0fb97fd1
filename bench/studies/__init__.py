"""The studies: experiments that use the library to answer one question each, with a results page.

One module (or one small package) per study, named after its results page in docs/results/:

- :mod:`bench.studies.ablation`: ``deploy-prune ablate``, the paper's ablations (ablation.md);
- :mod:`bench.studies.paper_claims`: ``deploy-prune bench suite``, the papers' operating points
  measured (paper_claims.md, and the README's tables);
- :mod:`bench.studies.latency_target`: the latency-targeted allocation against FLOPs targeting
  (latency_target.md);
- :mod:`bench.studies.fashion_accuracy`: top-1 of the timed artifacts next to their speedups
  (fashion_accuracy.md).

Studies import from ``deploy_prune``, ``export`` and ``bench``; nothing outside this package
imports a study (``tests/test_architecture.py`` checks it). A study reaches the command line
through an entry point in ``pyproject.toml``, as ``export`` and ``bench`` do.
"""
