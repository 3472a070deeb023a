"""``bloombee-nb``: join a cluster as a worker, or run one generation.

    bloombee-nb worker tcp://host:8786          # serve whatever span the scheduler's clients place here
                                                # (SIGTERM / Ctrl-C: hand the spans over, then exit; twice: exit now)
    bloombee-nb worker tcp://host:8786 --host MODEL   # lend it to the swarm: host the span of MODEL the swarm
                                                # needs most, for every client (and only MODEL); every
                                                # 5 s it moves where a lost span left layers unserved
    bloombee-nb swarm tcp://host:8786           # which worker hosts which layers of which model
    bloombee-nb chat --model smollm2.gguf       # a conversation whose KV cache stays on the stages
    bloombee-nb credentials ./creds             # TLS credentials; then `scheduler --tls ./creds`, `worker … --tls ./creds`
    bloombee-nb generate "def fibonacci(n):"    # embedded local cluster + the shipped model
    bloombee-nb serve --port 8000               # OpenAI-compatible HTTP API (bloombee_nb/serve/)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
import time


def _security(args):
    from .cluster.security import load_security

    return load_security(args.tls) if getattr(args, "tls", None) else None


def _credentials(args) -> int:
    from .cluster.security import make_credentials

    folder = make_credentials(args.folder, overwrite=args.force)
    print(f"wrote {folder}/ca.pem, cert.pem, key.pem — copy the folder to every member (scheduler, workers, "
          "clients) over a channel you trust; whoever holds it can run code on every worker", flush=True)
    return 0


def _scheduler(args) -> int:
    from distributed import Scheduler

    async def serve():
        async with Scheduler(host=args.host, port=args.port, security=_security(args),
                             dashboard_address=args.dashboard_address,
                             protocol="tls" if args.tls else "tcp") as scheduler:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, lambda: asyncio.ensure_future(scheduler.close()))
            print(f"bloombee-nb scheduler at {scheduler.address}", flush=True)
            await scheduler.finished()

    asyncio.run(serve())
    return 0


def _worker(args) -> int:
    from distributed import Worker

    for model in args.host:
        if _looks_like_an_address(model):
            print(f"bloombee-nb worker: --host names a MODEL to host for the swarm; {model!r} looks like a network "
                  f"address: listen on it with --listen {model}", file=sys.stderr)
            return 2

    import importlib

    import dask

    from .cluster.connect import STAGE_WORKER_CONFIG

    # the stage code (torch, transformers) before joining: a lender that joins is ready to load its span
    # (imported after joining, the churn soak's rejoined lenders hosted ~30 s after joining instead of ~1 s)
    importlib.import_module("bloombee_nb.cluster.stage")

    # this process is the worker (no nanny): glibc's trim threshold is the environment's; the profiler is off
    dask.config.set({"distributed.worker.profile.enabled": STAGE_WORKER_CONFIG["distributed.worker.profile.enabled"]})

    async def serve():
        async with Worker(args.scheduler, nthreads=args.nthreads, name=args.name, host=args.listen_host,
                          memory_limit=args.memory_limit, security=_security(args),
                          protocol="tls" if args.tls else None) as worker:
            leave = _Leave(worker, args)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, leave.signal)
            print(f"bloombee-nb worker {worker.address} joined {args.scheduler}", flush=True)
            joined = time.monotonic()
            if args.host or args.allow:
                from .cluster.policy import POLICY, HostPolicy

                await worker.plugin_add(HostPolicy([*args.host, *args.allow]), name=POLICY)
            for model in args.host:
                await asyncio.to_thread(_host_here, args, worker.address, model, joined)
            if args.host and args.rebalance_every > 0:
                threading.Thread(target=_keep_balanced, args=(args, worker.address, leave.stop), daemon=True,
                                 name="bloombee-rebalance").start()
            await worker.finished()

    asyncio.run(serve())
    return 0


def _looks_like_an_address(text: str) -> bool:
    import ipaddress
    from pathlib import Path

    if Path(text).expanduser().exists():
        return False
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return text in ("localhost", "0.0.0.0")


def _host_here(args, address: str, model: str, joined: float) -> None:
    """``--host MODEL``: this worker takes the span of MODEL the swarm needs most (see
    :func:`bloombee_nb.cluster.swarm.host`), as many layers as ``--layers`` (default: all)."""
    import bloombee_nb as bb

    with bb.connect(args.scheduler, security=_security(args)) as cluster:
        try:
            (span,) = bb.host(model, cluster, workers=[address], layers_per_worker=args.layers or 1 << 30,
                              num_threads=args.nthreads, **({"quantize": args.quantize} if args.quantize else {}))
        except Exception as exc:  # noqa: BLE001 — the worker keeps serving; the owner reads why
            print(f"bloombee-nb worker {address} could not host {model}: {type(exc).__name__}: {exc}", flush=True)
            return
    print(f"bloombee-nb worker {address} hosts layers {span.start}–{span.end - 1} of {span.model} "
          f"({time.monotonic() - joined:.1f} s after joining)", flush=True)


def _keep_balanced(args, address: str, stop: threading.Event) -> None:
    """``--host``: every ``--rebalance-every`` seconds until the worker leaves, ask the swarm whether
    this worker's span should move (:func:`bloombee_nb.cluster.swarm.rebalance`) and move it."""
    import bloombee_nb as bb

    with bb.connect(args.scheduler, security=_security(args)) as cluster:
        while not stop.wait(args.rebalance_every):
            for model in args.host:
                try:
                    for old, new in bb.rebalance(cluster, model, workers=[address], capacity=args.layers or 1 << 30,
                                                 by=args.rebalance_by, num_threads=args.nthreads):
                        print(f"bloombee-nb worker {address} moved from layers {old.start}–{old.end - 1} to "
                              f"{new.start}–{new.end - 1} of {new.model}", flush=True)
                except Exception as exc:  # noqa: BLE001 — the worker keeps serving; the owner reads why
                    if stop.is_set():
                        return
                    print(f"bloombee-nb worker {address} could not rebalance {model}: {type(exc).__name__}: {exc}",
                          flush=True)


def _hand_over_here(args, address: str) -> None:
    import bloombee_nb as bb
    from .cluster.swarm import hand_over

    try:
        with bb.connect(args.scheduler, security=_security(args)) as cluster:
            for s in hand_over(cluster, address):
                print(f"bloombee-nb worker {address} handed layers {s.start}–{s.end - 1} of {s.model} to {s.name}",
                      flush=True)
    except Exception as exc:  # noqa: BLE001 — leaving goes on; clients recover by replay where they can
        print(f"bloombee-nb worker {address} could not hand its spans over: {type(exc).__name__}: {exc}", flush=True)


def _chat(args) -> int:
    """A conversation on stdin/stdout; the KV cache of the whole conversation stays on the stages."""
    from transformers import AutoTokenizer, TextStreamer

    import bloombee_nb as bb
    from bloombee_nb.generate.chat import Chat
    from bloombee_nb.model.checkpoint import resolve_checkpoint

    tok = AutoTokenizer.from_pretrained(resolve_checkpoint(args.model))
    if not getattr(tok, "chat_template", None):
        print(f"bloombee-nb chat: {args.model} has no chat template; give an instruct model (a .gguf file works: "
              "`python -m bloombee_nb.model.gguf` fetches SmolLM2-135M-Instruct)", file=sys.stderr)
        return 2
    cluster = bb.connect(args.scheduler, security=_security(args)) if args.scheduler else bb.connect(n_workers=args.workers)
    with cluster:
        model = bb.DistributedModelForCausalLM.from_pretrained(args.model, cluster=cluster)
        with Chat(model, tok, system=args.system, max_new_tokens=args.max_new_tokens) as chat:
            while True:
                print("> ", end="", flush=True)
                line = sys.stdin.readline()
                if not line or line.strip() in ("/exit", "/quit"):
                    break
                if line.strip():
                    chat.say(line.strip(), streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
        model.close()
    return 0


def _swarm(args) -> int:
    import bloombee_nb as bb

    with bb.connect(args.scheduler, security=_security(args)) as cluster:
        print(repr(bb.swarm(cluster)))
    return 0


class _Leave:
    """The first SIGTERM/SIGINT: leave gracefully. Every stage here refuses new steps (its clients
    replay their sessions on other workers: a pause, nothing lost), the scheduler stops placing work
    here (status ``closing_gracefully``), and the worker exits once no session is open on its stages
    or after ``grace_s``. A worker lent to the swarm (``--host``) first hands over the spans no other
    worker replicates (``swarm.hand_over``). A second signal exits at once."""

    def __init__(self, worker, args):
        self.worker, self.args, self.grace_s, self.task = worker, args, args.leave_grace_s, None
        self.stop = threading.Event()  # set when leaving: no more rebalancing moves

    def signal(self) -> None:
        self.stop.set()
        if self.task is None:
            self.task = asyncio.ensure_future(self.leave())
            return
        print("bloombee-nb worker: second signal, closing now", flush=True)
        self.task.cancel()
        asyncio.ensure_future(self.worker.close())

    async def leave(self) -> None:
        from distributed.core import Status

        from .cluster.stage import begin_leaving, open_sessions

        if self.args.host:
            await asyncio.to_thread(_hand_over_here, self.args, self.worker.address)
        stages = begin_leaving(self.worker)
        self.worker.status = Status.closing_gracefully
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        print(f"bloombee-nb worker {self.worker.address} leaving: {open_sessions(self.worker)} sessions open on "
              f"{len(stages)} stages, waiting up to {self.grace_s:.0f}s for them to move", flush=True)
        while open_sessions(self.worker) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        left = open_sessions(self.worker)
        # which sessions, and whose: what the owner of a client that did not move them needs to know
        held = "; ".join(f"{sid[:12]} of {owner or '?'}" for st in stages for sid, owner in st.session_owners())
        print(f"bloombee-nb worker {self.worker.address} left"
              + (f" ({left} sessions still open: {held})" if left else ""), flush=True)
        await self.worker.close()


def _generate(args) -> int:
    if not args.scheduler:  # an embedded cluster's workers import torch in the forkserver beside our imports
        from .cluster.connect import preload_forkserver

        preload_forkserver()
    import torch
    from transformers import AutoTokenizer, TextStreamer

    import bloombee_nb as bb
    from bloombee_nb.shipped import default_model_path

    model_path = args.model or default_model_path()
    tok = AutoTokenizer.from_pretrained(model_path)
    cluster = (bb.connect(args.scheduler, security=args.tls) if args.scheduler
               else bb.connect(n_workers=args.workers))
    with cluster:
        model = bb.DistributedModelForCausalLM.from_pretrained(model_path, cluster=cluster)
        print(f"# {model_path} on {len(model.placement.stages)} stages: "
              + ", ".join(f"layers {s.start}–{s.end - 1}" for s in model.placement.stages), file=sys.stderr)
        ids = tok(args.prompt, return_tensors="pt")
        sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) \
            if args.temperature > 0 else dict(do_sample=False)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, streamer=TextStreamer(tok, skip_special_tokens=True),
                             pad_token_id=tok.pad_token_id, **sampling)
        dt = time.perf_counter() - t0
        n = out.shape[1] - ids["input_ids"].shape[1]
        print(f"\n# {n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s", file=sys.stderr)
        model.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    # Long: a flat list of every subcommand's options, then one dispatch; read top to bottom it is
    # the whole command-line surface, which splitting it per subcommand would scatter.
    p = argparse.ArgumentParser(prog="bloombee-nb", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("worker", help="join a Dask scheduler and host spans of models")
    w.add_argument("scheduler", help="scheduler address, e.g. tcp://10.0.0.5:8786")
    w.add_argument("--nthreads", type=int, default=1)
    w.add_argument("--name", default=None)
    w.add_argument("--listen", dest="listen_host", default=None,
                   help="address to listen on (default: the one facing the scheduler)")
    w.add_argument("--host", metavar="MODEL", action="append", default=[],
                   help="host a span of MODEL (checkpoint folder or Hub id) for the swarm; repeatable")
    w.add_argument("--allow", metavar="MODEL", action="append", default=[],
                   help="also allow clients to place spans of MODEL here; with --host/--allow no other model loads")
    w.add_argument("--layers", type=int, default=None, help="with --host: at most this many layers (default: all)")
    w.add_argument("--quantize", choices=["int8", "int4", "nf4"], default=None,
                   help="with --host: hold the span's weights quantized (clients asking for this format attach)")
    w.add_argument("--rebalance-every", type=float, default=5.0, metavar="SECONDS",
                   help="with --host: this often, move the span where the swarm needs it (e.g. layers whose only "
                        "host was lost), when a replica elsewhere keeps its layers served; 0: never")
    w.add_argument("--rebalance-by", choices=["replicas", "speed"], default="replicas",
                   help="with --host: what a move must raise at the least-served layer: its replica count, or the "
                        "tokens/s its hosts serve from their speeds measured at load (for a swarm of very different "
                        "machines; a move then has to more than double it)")
    w.add_argument("--memory-limit", default="auto")
    w.add_argument("--tls", metavar="FOLDER", default=None,
                   help="credentials folder (bloombee-nb credentials): mutual TLS, tls:// scheduler address")
    w.add_argument("--leave-grace-s", type=float, default=30.0,
                   help="on SIGTERM, wait at most this long for sessions to move off this worker before exiting")
    w.set_defaults(run=_worker)

    c = sub.add_parser("credentials", help="write TLS credentials (key + self-signed certificate) for a cluster")
    c.add_argument("folder")
    c.add_argument("--force", action="store_true", help="replace existing credentials in the folder")
    c.set_defaults(run=_credentials)

    s = sub.add_parser("scheduler", help="run a Dask scheduler (with --tls: members must hold the credentials)")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=8786)
    s.add_argument("--dashboard-address", default=":8787")
    s.add_argument("--tls", metavar="FOLDER", default=None, help="credentials folder: mutual TLS")
    s.set_defaults(run=_scheduler)

    ch = sub.add_parser("chat", help="talk to an instruct model; the conversation's KV cache stays on the stages")
    ch.add_argument("--model", required=True, help="checkpoint folder with a chat template, or a .gguf file")
    ch.add_argument("--scheduler", default=None, help="use this Dask scheduler instead of an embedded cluster")
    ch.add_argument("--workers", type=int, default=3, help="workers of the embedded cluster")
    ch.add_argument("--system", default=None, help="a system message")
    ch.add_argument("--max-new-tokens", type=int, default=128)
    ch.add_argument("--tls", metavar="FOLDER", default=None, help="credentials folder for a --scheduler with TLS")
    ch.set_defaults(run=_chat)

    sw = sub.add_parser("swarm", help="show which worker hosts which layers of which model, and their load")
    sw.add_argument("scheduler", help="scheduler address")
    sw.add_argument("--tls", metavar="FOLDER", default=None, help="credentials folder for a scheduler with TLS")
    sw.set_defaults(run=_swarm)

    g = sub.add_parser("generate", help="generate text on the embedded local cluster (or --scheduler)")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="checkpoint folder or Hub id (default: the shipped tiny model)")
    g.add_argument("--scheduler", default=None, help="use this Dask scheduler instead of an embedded cluster")
    g.add_argument("--workers", type=int, default=3, help="workers of the embedded cluster")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--tls", metavar="FOLDER", default=None, help="credentials folder for a --scheduler with TLS")
    g.set_defaults(run=_generate)

    from .serve.cli import add_serve_command  # the OpenAI-compatible server: bloombee_nb/serve/

    add_serve_command(sub)

    args = p.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
