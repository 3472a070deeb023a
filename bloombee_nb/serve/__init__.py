"""An OpenAI-compatible HTTP endpoint for a model served by the swarm.

    bloombee-nb serve [MODEL] [--scheduler tcp://host:8786] --port 8000 [--api-key KEY ...]
    %bloombee serve --port 8000                 # the notebook's model, in the kernel's background

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="tiny-llama", messages=[...], stream=True)

``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (the tokenizer's chat template),
server-sent-event streaming, ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``n``,
usage counts, errors in OpenAI's JSON shape. Each request is a session on the stages; concurrent
requests are concurrent sessions whose decode steps merge at every stage.

What a server is doing (requests generating and queued, served, refused, tokens/s, per API key:
:mod:`.activity`) shows in ``%bloombee status`` and on the cluster's Dask dashboard at
``/bloombee/serve`` (:mod:`.dashboard`: ``Client.log_event`` plus a scheduler plugin's route).

Why FastAPI + uvicorn + sse-starlette (not aiohttp): the OpenAI request schemas become pydantic
models, so every malformed body is a typed 4xx without hand-written checks; uvicorn serves TLS
from a certificate and key with its own options and runs on a thread of a Jupyter kernel (its
signal handlers are installed only on the main thread); sse-starlette writes the event-stream
framing, keep-alive pings, and notices a client that hung up (we then cancel its generation).
It is also the stack vLLM, SGLang and llama-cpp-python's server use, so clients meet the same
edge behaviour. aiohttp + aiohttp-sse would have meant validating the bodies by hand.

Needs the ``serve`` extra: ``pip install 'bloombee_nb[serve]'``.
"""

from __future__ import annotations

from .errors import ServeError, ServeStartError

__all__ = ["serve", "Server", "ServeSettings", "TLSFiles", "ServeError", "ServeStartError"]


def serve(model, tokenizer, name: str | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          settings=None, tls=None) -> "Server":
    """Serve ``model`` (a ``DistributedModelForCausalLM``) over HTTP in the background; returns the
    running :class:`Server` (``.url``, ``.stop()``, ``.snapshot()``). ``name``: the model id clients
    send (default: the checkpoint folder's name). The server's activity goes to the model's Dask
    scheduler, whose dashboard shows it at ``/bloombee/serve`` (``server.dashboard_link``).

    The caller owns the server: the notebook keeps the ones ``%bloombee serve`` started in its
    session (:mod:`bloombee_nb.notebook.state`), the CLI waits on its one."""
    try:
        from .app import ServeSettings, create_app
        from .engine import Engine
        from .server import Server
    except ImportError as exc:
        raise ServeStartError(f"serving needs the 'serve' extra ({exc.name} is missing): "
                              "pip install 'bloombee_nb[serve]'") from None
    if tokenizer is None:
        raise ServeStartError("serving needs the model's tokenizer: save one beside the checkpoint "
                              "(tokenizer.save_pretrained(path))")
    name = name or default_name(model)
    client = getattr(getattr(model, "cluster", None), "client", None)
    app = create_app(Engine(model, tokenizer, name), settings or ServeSettings())
    return Server(app, host, port, tls, client=client).start()


def default_name(model) -> str:
    """The id clients use: the last part of the checkpoint path or Hub id (``tiny-llama``)."""
    path = str(getattr(model.config, "_name_or_path", "") or "model")
    return path.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]


def __getattr__(name):  # lazily: importing the package must not need the extra
    if name == "Server":
        from .server import Server
        return Server
    if name == "TLSFiles":
        from .server import TLSFiles
        return TLSFiles
    if name == "ServeSettings":
        from .app import ServeSettings
        return ServeSettings
    raise AttributeError(name)
