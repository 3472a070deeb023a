"""``bloombee-nb serve``: the parser and the command (``bloombee_nb/cli.py`` only registers it)."""

from __future__ import annotations

import signal
import sys


def add_serve_command(sub) -> None:
    """Add ``serve`` to the ``bloombee-nb`` subcommands."""
    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API "
                                     "(embedded cluster or --scheduler)")
    s.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder or Hub id (default: the shipped tiny model)")
    s.add_argument("--scheduler", default=None, help="use this Dask scheduler instead of an embedded cluster")
    s.add_argument("--workers", type=int, default=3, help="workers of the embedded cluster")
    s.add_argument("--tls", metavar="FOLDER", default=None, help="credentials folder for a --scheduler with TLS")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the checkpoint folder's name)")
    s.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept requests bearing this key (repeatable); without any, no key is needed")
    s.add_argument("--rate-limit", type=float, default=None, metavar="PER_MINUTE",
                   help="requests per minute per key (per client address without keys)")
    s.add_argument("--burst", type=int, default=10, help="requests a key may send at once before the rate applies")
    s.add_argument("--max-running", type=int, default=8, help="requests generating at once (sessions on the stages)")
    s.add_argument("--max-queue", type=int, default=32, help="requests waiting for a slot; more get 429")
    s.add_argument("--throughput", action="store_true",
                   help="concurrent requests' decode steps travel the chain together (more tokens/s under load, "
                        "a little more latency for a lone request)")
    s.add_argument("--ssl-certfile", default=None, help="PEM certificate: serve HTTPS (with --ssl-keyfile)")
    s.add_argument("--ssl-keyfile", default=None, help="PEM private key of --ssl-certfile")
    s.set_defaults(run=run_serve)


def run_serve(args) -> int:
    from transformers import AutoTokenizer

    import bloombee_nb as bb
    from bloombee_nb.shipped import default_model_path

    from . import serve
    from .app import ServeSettings
    from .server import TLSFiles

    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        print("bloombee-nb serve: --ssl-certfile and --ssl-keyfile go together", file=sys.stderr)
        return 2
    path = args.model or default_model_path()
    settings = ServeSettings(api_keys=tuple(args.api_key), rate_per_minute=args.rate_limit, burst=args.burst,
                             max_running=args.max_running, max_queue=args.max_queue)
    tls = TLSFiles(args.ssl_certfile, args.ssl_keyfile) if args.ssl_certfile else None
    tokenizer = AutoTokenizer.from_pretrained(path)
    cluster = bb.connect(args.scheduler, security=args.tls) if args.scheduler else bb.connect(n_workers=args.workers)
    with cluster:
        model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster,
                                                               group=True if args.throughput else None)
        try:
            server = serve(model, tokenizer, args.served_model_name, host=args.host, port=args.port,
                           settings=settings, tls=tls)
            signal.signal(signal.SIGTERM, lambda *_: server.stop())
            print(f"bloombee-nb serving {server.app.state.bloombee.engine.name} at {server.url} "
                  f"({len(model.placement.stages)} stages; Ctrl-C stops)", flush=True)
            if server.dashboard_link:
                print(f"requests served, live on the Dask dashboard: {server.dashboard_link}", flush=True)
            server.wait()
        finally:
            model.close()
    return 0
