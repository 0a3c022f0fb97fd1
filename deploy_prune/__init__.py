"""deploy-prune core: learned-importance channel pruning, surgery and one-step recovery.

The Python API (:mod:`deploy_prune.api`) is reachable from here and imported on first use, so
``import deploy_prune`` stays cheap::

    slim, plan = deploy_prune.prune(model, example_inputs, loader=loader, target_flops=3.0)
    deploy_prune.recover(slim, model, loader, plan=plan)
    deploy_prune.save(slim, plan, "slim_dir"); deploy_prune.load("slim_dir", model=MyNet())
"""

__version__ = "0.1.0"
__all__ = ["prune", "recover", "save", "load", "evaluate"]


def __getattr__(name: str):
    if name in __all__:
        from deploy_prune import api

        return getattr(api, name)
    raise AttributeError(f"module 'deploy_prune' has no attribute {name!r}")
