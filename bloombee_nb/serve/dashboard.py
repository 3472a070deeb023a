"""Serving activity on the Dask dashboard: ``<dashboard>/bloombee/serve`` (and ``.json``).

Two Dask mechanisms, nothing of our own on the wire:

- the server's process sends its :class:`~.activity.ServeSnapshot` (a plain dict) to the
  scheduler's event log with ``Client.log_event(TOPIC, …)`` once a second while it changes
  (:class:`Publisher`); ``Client.get_events(TOPIC)`` reads the history from anywhere;
- :class:`ServeBoard`, a scheduler plugin (``Client.register_plugin``), adds two routes to the
  scheduler's own HTTP server, the one that serves the dashboard: an HTML page that draws the
  newest snapshot of every server that logged one (refreshing itself), and the same as JSON.

So every server of the cluster (a ``bloombee-nb serve --scheduler …`` process, a notebook's
``%bloombee serve``) shows on the one dashboard its users already open, with or without bokeh.
"""

from __future__ import annotations

import html
import logging
import threading
from typing import Callable

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.http.utils import RequestHandler

from .activity import ServeSnapshot, snapshots_html

TOPIC = "bloombee-serve"          # the scheduler's event-log topic
ROUTE = "/bloombee/serve"         # the page on the scheduler's HTTP server (ROUTE + ".json": the data)
REFRESH_S = 2                     # the page reloads itself this often
log = logging.getLogger(__name__)


def latest(events) -> list[ServeSnapshot]:
    """The newest snapshot of each server in ``events`` (``(time, msg)`` pairs), running ones first."""
    newest: dict[str, dict] = {}
    for _, msg in events:
        if isinstance(msg, dict) and "server" in msg:
            newest[msg["server"]] = msg
    snaps = [ServeSnapshot.from_dict(m) for m in newest.values()]
    return sorted(snaps, key=lambda s: (not s.running, -s.started_s))


class ServePage(RequestHandler):
    """``/bloombee/serve``: every server's requests, tokens and callers, as the status panel draws them."""

    def get(self):
        snaps = latest(self.server.get_events(TOPIC))
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='{REFRESH_S}'>"
                   "<title>bloombee_nb serving</title><style>body{font-family:sans-serif}td,th{padding:2px 8px;"
                   "text-align:right}td:first-child,th:first-child{text-align:left}</style></head><body>"
                   f"<h3>bloombee_nb: requests served over HTTP</h3>{snapshots_html(snaps, 'servers')}"
                   f"<p>{html.escape(_summary(snaps))} · <a href='{ROUTE}.json'>JSON</a> · "
                   "<a href='../status'>Dask dashboard</a></p></body></html>")


class ServeJSON(RequestHandler):
    """``/bloombee/serve.json``: ``{"servers": [snapshot dict, …]}``."""

    def get(self):
        self.write({"servers": [s.to_dict() for s in latest(self.server.get_events(TOPIC))]})


def _summary(snaps: list[ServeSnapshot]) -> str:
    up = [s for s in snaps if s.running]
    return (f"{len(up)} running, {sum(s.generating for s in up)} requests generating, "
            f"{sum(s.tokens_per_s for s in up):.1f} tokens/s in all")


class ServeBoard(SchedulerPlugin):
    """Adds :data:`ROUTE` to the scheduler's HTTP server (once: registering again keeps it)."""

    name = "bloombee-serve-board"
    idempotent = True

    async def start(self, scheduler) -> None:
        app = getattr(scheduler, "http_application", None)
        if app is None:  # a scheduler started without its HTTP server
            return
        app.add_handlers(r".*", [(ROUTE, ServePage, {"dask_server": scheduler}),
                                 (ROUTE + ".json", ServeJSON, {"dask_server": scheduler})])


def board_link(client) -> str | None:
    """The page's address, beside the dashboard's (None when the scheduler serves no HTTP)."""
    try:
        link = client.dashboard_link
    except Exception:  # noqa: BLE001 - no dashboard service on this scheduler
        return None
    return (link[: -len("/status")] if link.endswith("/status") else link.rstrip("/")) + ROUTE


class Publisher:
    """Logs ``snapshot()`` to the scheduler's :data:`TOPIC` every ``period_s`` while it changes, and
    once more when stopped. A scheduler that cannot take the plugin still gets the events."""

    def __init__(self, client, snapshot: Callable[[], ServeSnapshot], period_s: float = 1.0):
        self.client, self.snapshot, self.period_s = client, snapshot, period_s
        self._stop = threading.Event()
        self._last: dict | None = None
        self._thread = threading.Thread(target=self._loop, name="bloombee-serve-publisher", daemon=True)

    def start(self) -> "Publisher":
        try:
            self.client.register_plugin(ServeBoard())
        except Exception as exc:  # noqa: BLE001 - e.g. the scheduler's Python lacks bloombee_nb: events only
            log.warning("the scheduler could not add the %s page (%s: %s)", ROUTE, type(exc).__name__, exc)
        self.publish()
        self._thread.start()
        return self

    def publish(self) -> None:
        """Send the snapshot if it changed since the last one sent (its time aside)."""
        snap = self.snapshot().to_dict()
        if {**snap, "at_s": 0} == self._last:
            return
        try:
            self.client.log_event(TOPIC, snap)
        except Exception as exc:  # noqa: BLE001 - the cluster went away: the server keeps serving
            log.warning("could not send serving activity to the scheduler (%s: %s)", type(exc).__name__, exc)
            self._stop.set()
            return
        self._last = {**snap, "at_s": 0}

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.publish()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)
        self.publish_final()

    def publish_final(self) -> None:
        self._last = None
        self.publish()
