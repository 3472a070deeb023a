"""Run the app under uvicorn on a background thread: the CLI's foreground server and the notebook's
``%bloombee serve`` are the same object, :class:`Server`."""

from __future__ import annotations

import html
import os
import threading
import time
from dataclasses import dataclass

from .activity import ServeSnapshot, snapshots_html
from .errors import ServeStartError


@dataclass(frozen=True)
class TLSFiles:
    """A PEM certificate (chain) and its private key: uvicorn serves HTTPS with them."""

    certfile: str
    keyfile: str


class Server:
    """An OpenAI-compatible HTTP server for one model, on its own thread and event loop.

    ``port=0`` takes a free port (:attr:`port` says which). :meth:`stop` shuts it down (open
    streams end, the generation pool drains)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8000, tls: TLSFiles | None = None, client=None):
        import uvicorn

        self.app, self.host, self.tls = app, host, tls
        self.client = client          # the Dask client whose scheduler's dashboard shows this server (or None)
        self._publisher = None
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                ssl_certfile=tls.certfile if tls else None, ssl_keyfile=tls.keyfile if tls else None,
                                timeout_graceful_shutdown=5)
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"bloombee-serve-{port}", daemon=True)
        self._error: BaseException | None = None
        self.port = port

    def _run(self) -> None:
        try:
            self._uvicorn.run()
        except BaseException as exc:  # noqa: BLE001 - uvicorn exits with SystemExit on a bind error
            self._error = exc

    def start(self, timeout_s: float = 30.0) -> "Server":
        """Start serving; returns once the socket listens (raises :class:`ServeStartError` if it cannot)."""
        if self.tls is not None:
            _check_tls(self.tls)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ServeStartError(f"could not serve on {self.host}:{self.port} ({self._error!r}): is the port "
                                      "taken? pick another with --port (0: any free port)")
            time.sleep(0.02)
        self.port = self._uvicorn.servers[0].sockets[0].getsockname()[1]
        if self.client is not None:
            from .dashboard import Publisher

            self._publisher = Publisher(self.client, self.snapshot).start()
        return self

    @property
    def url(self) -> str:
        """The base URL for OpenAI clients (``base_url=``), ending in ``/v1``."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and self._uvicorn.started

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C stops it)."""
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            self.stop()

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(15)
        state = getattr(self.app.state, "bloombee", None)
        if state is not None:
            state.pool.shutdown(wait=False, cancel_futures=True)
        if self._publisher is not None:
            self._publisher.stop()  # the dashboard shows the server as stopped

    # -- what a notebook and the dashboard show
    def snapshot(self) -> ServeSnapshot:
        """Requests generating, queued and served, tokens/s, callers: now."""
        st = self.app.state.bloombee
        return st.activity.snapshot(server=f"{self.url} (pid {os.getpid()})", model=st.engine.name, url=self.url,
                                    running=self.running, admitted=st.admission.admitted)

    @property
    def dashboard_link(self) -> str | None:
        """The Dask dashboard's page of serving activity (None without a cluster client)."""
        from .dashboard import board_link

        return board_link(self.client) if self.client is not None else None

    def __repr__(self) -> str:
        return f"<bloombee_nb server: {self.snapshot().text()}>"

    def _repr_html_(self) -> str:
        link = self.dashboard_link
        more = f" · <a href='{html.escape(link)}' target='_blank'>on the Dask dashboard</a>" if link else ""
        return snapshots_html([self.snapshot()]) + (f"<div>{more[3:]}</div>" if more else "")


def _check_tls(tls: TLSFiles) -> None:
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.certfile, tls.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ServeStartError(f"cannot use the TLS certificate {tls.certfile} with key {tls.keyfile}: {exc}; "
                              "pass PEM files of one pair (e.g. from `bloombee-nb credentials FOLDER`)") from None
