"""Which front end runs the kernel, and how to show things there.

Live widgets (ipywidgets 8 + plotly ``FigureWidget``, an anywidget) need a kernel with a widget
manager that speaks ipywidgets 8: JupyterLab, classic Notebook 7, VS Code. Colab's widget manager
lags behind, and a terminal IPython has none; there we draw static figures and print plain text.

    display_mode()            # "widgets" in JupyterLab, "static" in Colab or a terminal
    display_mode("static")    # an explicit choice wins (also: $BLOOMBEE_NB_DISPLAY)
"""

from __future__ import annotations

import importlib.util
import os
import sys

MODES = ("auto", "widgets", "static")
LIVE_PACKAGES = ("ipywidgets", "plotly", "anywidget")


def display_mode(preference: str = "auto") -> str:
    """``"widgets"`` or ``"static"``: ``preference`` if explicit, else ``$BLOOMBEE_NB_DISPLAY``, else detected."""
    if preference not in MODES:
        raise ValueError(f"display mode must be one of {MODES}, got {preference!r}")
    if preference == "auto":
        preference = os.environ.get("BLOOMBEE_NB_DISPLAY", "auto")
    if preference in ("widgets", "static"):
        return preference
    return "widgets" if why_static() is None else "static"


def why_static() -> str | None:
    """Why live widgets cannot render here (``None`` when they can)."""
    if "google.colab" in sys.modules:
        return "Colab's widget manager does not support ipywidgets 8"
    try:
        from IPython import get_ipython
    except ImportError:
        return "not running under IPython"
    shell = get_ipython()
    if shell is None or getattr(shell, "kernel", None) is None:
        return "no Jupyter kernel (terminal IPython or a plain script)"
    missing = [p for p in LIVE_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        return f"missing {', '.join(missing)} (pip install 'bloombee_nb[notebook]')"
    return None


def show(obj) -> None:
    """``IPython.display.display`` (a no-op outside IPython)."""
    from IPython.display import display

    display(obj)


def show_figure(fig) -> None:
    """Show a plotly figure without live widgets: plotly's own MIME type (JupyterLab, VS Code) plus
    HTML loading plotly.js from its CDN (Colab), and a text line for terminals — never a browser tab."""
    import json

    from IPython.display import display

    title = fig.layout.title.text or "plotly figure"
    display({"application/vnd.plotly.v1+json": json.loads(fig.to_json()),  # plotly's encoder knows numpy
             "text/html": fig.to_html(include_plotlyjs="cdn", full_html=False),
             "text/plain": f"<figure: {title}>"}, raw=True)
