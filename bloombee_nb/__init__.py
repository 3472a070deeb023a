"""bloombee_nb — decentralized LLM inference over Dask, driven from a notebook.

    import bloombee_nb as bb
    cluster = bb.connect()                                   # embedded LocalCluster
    model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster)
    out = model.generate(input_ids, max_new_tokens=64)

Heavy parts (torch, transformers, dask) are imported on first use, so ``import bloombee_nb``
stays cheap (e.g. for ``%load_ext`` or the CLI's ``--help``).
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "connect": "bloombee_nb.cluster.connect",
    "BloombeeCluster": "bloombee_nb.cluster.connect",
    "DistributedModelForCausalLM": "bloombee_nb.generate.model",
    "DeployConfig": "bloombee_nb.generate.options",
    "InferenceSession": "bloombee_nb.generate.session",
    "errors": "bloombee_nb.errors",
    "host": "bloombee_nb.cluster.swarm",
    "unhost": "bloombee_nb.cluster.swarm",
    "rebalance": "bloombee_nb.cluster.swarm",
    "swarm": "bloombee_nb.cluster.swarm",
}

__all__ = [*_LAZY, "__version__", "load_ipython_extension", "unload_ipython_extension"]


def load_ipython_extension(ipython):
    """``%load_ext bloombee_nb``: the ``%bloombee`` magics (see :mod:`bloombee_nb.notebook`)."""
    from .notebook import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython):
    from .notebook import unload_ipython_extension as unload

    unload(ipython)


def __getattr__(name):
    if name in _LAZY:
        module = import_module(_LAZY[name])
        return module if name == "errors" else getattr(module, name)
    raise AttributeError(f"module 'bloombee_nb' has no attribute {name!r}")
