"""The notebook front: ``%bloombee`` magics, the plan widget, the link map, the generation panel.

    %load_ext bloombee_nb
    %bloombee connect local --workers 2
    %bloombee plan
    %%bloombee generate --max-new-tokens 32
    def fibonacci(n):

The same parts from Python: ``session()`` (the active cluster, model, tokenizer, profile),
``PlanWidget(profile, model=…)``, ``figures.link_map(profile, plan)``, ``generate_text(…)``.
ipywidgets, plotly and transformers are imported only when a view needs them, so loading the
extension is cheap.
"""

from importlib import import_module

_LAZY = {
    "session": "bloombee_nb.notebook.state",
    "NotebookSession": "bloombee_nb.notebook.state",
    "NotebookError": "bloombee_nb.notebook.state",
    "BloombeeMagics": "bloombee_nb.notebook.magics",
    "PlanWidget": "bloombee_nb.notebook.plan_widget",
    "GenerationResult": "bloombee_nb.notebook.generation",
    "generate_text": "bloombee_nb.notebook.generation",
    "display_mode": "bloombee_nb.notebook.frontend",
}

__all__ = [*_LAZY, "load_ipython_extension", "unload_ipython_extension"]


def load_ipython_extension(ipython) -> None:
    """Register ``%bloombee`` / ``%%bloombee`` (and its ``%config BloombeeMagics`` traits)."""
    from .magics import BloombeeMagics

    ipython.register_magics(BloombeeMagics(shell=ipython))


def unload_ipython_extension(ipython) -> None:
    """Remove the magics; the session (cluster, model) stays until ``%bloombee disconnect``."""
    from .magics import BloombeeMagics

    for kind in ("line", "cell"):
        ipython.magics_manager.magics[kind].pop("bloombee", None)
    ipython.configurables[:] = [c for c in ipython.configurables if not isinstance(c, BloombeeMagics)]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name in ("figures", "frontend", "generation", "magics", "plan_widget", "state"):
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'bloombee_nb.notebook' has no attribute {name!r}")
