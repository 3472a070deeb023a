"""``%bloombee`` and ``%%bloombee generate``: parse the arguments, call the library, show the result.

Over 400 lines because the argument grammar of every subcommand (:func:`build_parser`) sits beside
the handler that reads it, so this one file is the whole ``%bloombee`` surface.

Defaults come from ``%config`` traits (``%config BloombeeMagics`` lists them), e.g.::

    %config BloombeeMagics.workers = 2
    %config BloombeeMagics.display = 'static'     # force the Colab-style fallback

Library errors arrive typed (:class:`~bloombee_nb.errors.BloombeeError`) and become a short
``UsageError`` here — the only place that happens.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from traitlets import CaselessStrEnum, Float, Integer, Unicode

from ..errors import BloombeeError
from .frontend import MODES, display_mode, show, why_static
from .state import session


class _Exit(Exception):
    """argparse finished on purpose (``-h``): stop without running anything."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message}\n{self.format_usage().strip()}  (%bloombee help)")

    def exit(self, status=0, message=None):
        if message:
            print(message)
        raise _Exit


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(lo: float, hi: float | None):
    """A float ≥ lo (and ≤ hi)."""
    def parse(text: str) -> float:
        value = float(text)
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi if hi is not None else '∞'}], got {value}")
        return value

    parse.__name__ = "number"
    return parse


def _identifier(name: str) -> str:
    if not name.isidentifier():
        raise argparse.ArgumentTypeError(f"needs a Python variable name, got {name!r}")
    return name


def _widths(text: str):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"needs 'auto' or positive widths like 2,2,1, got {text!r}")
    return widths


def _codec(label: str) -> str:
    from ..transport import Codec

    if label.strip().lower() == "auto":
        return "auto"
    try:
        return str(Codec.parse(label))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> _Parser:
    # Long: the argument grammar of every subcommand as one flat list of add_argument calls, in the
    # order help_text prints them; there is no logic to extract.
    p = _Parser(prog="%bloombee", add_help=False,
                description="Decentralized LLM inference over Dask, from the notebook.")
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND")

    c = sub.add_parser("connect", help="start an embedded cluster or join a Dask scheduler; place the model")
    c.add_argument("target", nargs="?", default="local", help="'local' (embedded LocalCluster) or tcp://host:port")
    c.add_argument("--workers", type=_positive_int,
                   help="workers of the local cluster (%%config BloombeeMagics.workers)")
    c.add_argument("--model",
                   help="checkpoint folder or Hub id (%%config BloombeeMagics.model; default: shipped tiny model)")
    c.add_argument("--no-model", action="store_true", help="connect only; place no model")
    c.add_argument("--relay", choices=["chain", "star"], default="chain",
                   help="'chain': stages forward to each other; 'star': the client relays every hop")
    c.add_argument("--through-scheduler", action="store_true",
                   help="reach workers through the scheduler (client behind NAT; automatic in Colab)")
    c.add_argument("--compression", type=_codec, metavar="CODEC",
                   help="'auto': per link, the blosc2 codec that pays for itself on its measured bandwidth; "
                        "or one codec for every link, e.g. zstd-1+shuffle (default: raw)")
    c.add_argument("--micro-batch", type=_positive_int, metavar="ROWS",
                   help="at most this many rows per stage forward; bigger batches go as pipelined micro-batches")
    c.add_argument("--throughput", action="store_true",
                   help="many users in this kernel: their decode steps travel the chain together (more tokens/s "
                        "under load, a little more latency when the stages are idle)")

    sub.add_parser("status", help="workers, the spans they host, each stage's open sessions, queued steps, "
                                  "micro-batch and memory per tier (fast tier, offloaded), the Dask dashboard link")
    sub.add_parser("disconnect", help="free the spans and close (or stop) the cluster")

    pr = sub.add_parser("profile", help="measure every worker and link (progress bar) for the planner")
    pr.add_argument("--out", metavar="NAME", type=_identifier, help="also store the ClusterProfile in this variable")

    pl = sub.add_parser("plan", help="the plan widget: edit the profile, re-solve live, apply")
    pl.add_argument("--objective", choices=["latency", "throughput"], help="(%%config BloombeeMagics.objective)")
    pl.add_argument("--batch", type=_positive_int, default=1, help="sequences decoded together")
    pl.add_argument("--prompt-len", type=_positive_int, default=128, help="tokens per prompt")
    pl.add_argument("--new-tokens", type=_positive_int, default=128, help="tokens generated per sequence")
    pl.add_argument("--planner", choices=["runtime", "full"], default="runtime",
                    help="'runtime': priced the way the chain relays hidden states (what --apply runs); "
                         "'full': the DP on the raw profile (view only)")
    pl.add_argument("--out", metavar="NAME", type=_identifier,
                    help="also store the widget (or, static, the Plan) in this variable")

    lk = sub.add_parser("links", help="the link map of the measured profile, chain of the current plan highlighted")
    lk.add_argument("--view", choices=["graph", "heatmap"], default="graph", help="nodes and edges, or matrices")

    g = sub.add_parser("generate",
                       help="(cell magic) %%%%bloombee generate: the cell body is the prompt; tokens stream")
    g.add_argument("--max-new-tokens", type=_positive_int, help="(%%config BloombeeMagics.max_new_tokens)")
    g.add_argument("--temperature", type=_fraction(0, None), help="0 = greedy (%%config BloombeeMagics.temperature)")
    g.add_argument("--top-k", type=_positive_int, default=50, help="sample among the k likeliest tokens")
    g.add_argument("--top-p", type=_fraction(0, 1), default=1.0, help="sample within this probability mass")
    g.add_argument("--seed", type=int, help="seed torch's generator for reproducible sampling")
    g.add_argument("--speculative", action="store_true",
                   help="a draft model on the client proposes token trees the chain verifies in one pass")
    g.add_argument("--draft", metavar="PATH", help="the draft for --speculative: a small causal LM with the same "
                                                   "tokenizer (default: the shipped draft, for the shipped model)")
    g.add_argument("--tree", type=_widths, default="auto", metavar="WIDTHS",
                   help="--speculative tree: children per node at each depth, e.g. 2,2,1 (default: auto, for the link)")
    g.add_argument("--out", metavar="NAME", type=_identifier, help="also store the GenerationResult in this variable")

    ch = sub.add_parser("chat", help="(cell magic) %%%%bloombee chat: the cell body is your message; the reply "
                                     "streams, and the conversation's KV cache stays on the stages between cells")
    ch.add_argument("--system", help="start a new conversation with this system message")
    ch.add_argument("--reset", action="store_true", help="start a new conversation")
    ch.add_argument("--max-new-tokens", type=_positive_int, help="(%%config BloombeeMagics.max_new_tokens)")

    sv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API (/v1/completions, "
                                      "/v1/chat/completions) in the background of the kernel")
    sv.add_argument("--port", type=int, help="port to listen on (default 8000; 0: any free port)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--api-key", action="append", default=[], metavar="KEY",
                    help="accept requests bearing this key (repeatable); without any, no key is needed")
    sv.add_argument("--rate-limit", type=_fraction(0, None), metavar="PER_MINUTE", help="requests per minute per key")
    sv.add_argument("--stop", action="store_true", help="stop the server on --port (without --port: every one)")
    sv.add_argument("--out", metavar="NAME", type=_identifier, help="also store the Server in this variable")

    hs = sub.add_parser("host", help="lend workers to the swarm: host spans of MODEL for every client of this "
                                     "cluster (they outlive this notebook; clients attach with from_pretrained)")
    hs.add_argument("model", nargs="?", help="checkpoint folder or Hub id (default: the notebook's model)")
    hs.add_argument("--workers", nargs="+", metavar="WORKER", help="worker names or addresses (default: every one)")
    hs.add_argument("--layers", type=_positive_int, help="at most this many layers per worker (default: an even share)")
    hs.add_argument("--stop", action="store_true", help="stop hosting MODEL (on --workers, default: every one)")

    sw = sub.add_parser("swarm", help="which worker hosts which layers of which model: replicas, load, sessions, "
                                      "clients")
    sw.add_argument("--out", metavar="NAME", type=_identifier, help="also store the SwarmView in this variable")

    sub.add_parser("help", help="this help")
    return p


def help_text() -> str:
    """Every subcommand with its options (what ``%bloombee help`` prints and ``%bloombee?`` shows)."""
    p = build_parser()
    subs = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    parts = [f"{p.description}\n\nUsage: %bloombee SUBCOMMAND [options]   |   %%bloombee generate [options] + prompt\n"]
    for name, sp in subs.choices.items():
        if name == "help":
            continue
        summary = next(a.help for a in subs._choices_actions if a.dest == name)
        usage = (sp.format_usage().strip().removeprefix("usage: ").replace(" [-h]", "")
                 .replace("%bloombee generate", "%%bloombee generate"))
        opts = [f"    {', '.join(a.option_strings) or a.dest:<18} {(a.help or '') % {}}"
                for a in sp._actions if a.help and not isinstance(a, argparse._HelpAction)]
        parts.append(f"{name}: {summary % {}}\n  {usage}\n" + "\n".join(opts))
    parts.append("help: this text (also %bloombee?)\n\n%config BloombeeMagics: workers, model, objective, "
                 "max_new_tokens, temperature, display (auto | widgets | static).")
    return "\n\n".join(parts)


@magics_class
class BloombeeMagics(Magics):
    """The ``%bloombee`` magics; registered by ``%load_ext bloombee_nb``."""

    workers = Integer(3, min=1, help="workers of `%bloombee connect local`").tag(config=True)
    model = Unicode("", help="checkpoint `%bloombee connect` places (empty: the shipped tiny model)").tag(config=True)
    objective = CaselessStrEnum(["latency", "throughput"], "latency",
                                help="objective of `%bloombee plan`").tag(config=True)
    max_new_tokens = Integer(64, min=1, help="tokens `%%bloombee generate` produces").tag(config=True)
    temperature = Float(0.0, help="sampling temperature of `%%bloombee generate` (0 = greedy)").tag(config=True)
    display = CaselessStrEnum(list(MODES), "auto",
                              help="'widgets', 'static' (Colab-style) or 'auto' (detect)").tag(config=True)

    @line_cell_magic
    def bloombee(self, line: str, cell: str | None = None):
        try:
            args = build_parser().parse_args(shlex.split(line))
        except ValueError as exc:  # shlex: unbalanced quotes
            raise UsageError(f"cannot parse {line!r}: {exc}") from None
        except _Exit:
            return None
        command = args.command or "help"
        if cell is not None and command not in ("generate", "chat"):
            raise UsageError(f"only `%%bloombee generate` and `%%bloombee chat` take a cell body, not `{command}`")
        try:
            return getattr(self, "_" + command)(args, cell)
        except BloombeeError as exc:
            raise UsageError(str(exc)) from None

    bloombee.__doc__ = help_text()

    @property
    def live(self) -> bool:
        return display_mode(self.display) == "widgets"

    def _store(self, name: str | None, value) -> None:
        if name:
            self.shell.user_ns[name] = value

    # ---- subcommands ------------------------------------------------------------------------
    def _help(self, args, cell):
        print(help_text())

    def _connect(self, args, cell):
        target = args.target
        if target != "local" and "://" not in target and ":" not in target:
            raise UsageError(f"connect to 'local' or a scheduler address like tcp://host:8786, got {target!r}")
        if target != "local" and args.workers is not None:
            raise UsageError("--workers only applies to `connect local`; a remote cluster has the workers it has")
        compression = None if args.compression in (None, "raw") else args.compression
        direct = not (args.through_scheduler or (target != "local" and "google.colab" in sys.modules))
        _stop_servers()
        session().connect(None if target == "local" else target, n_workers=args.workers or self.workers,
                          direct_to_workers=direct, model_path=args.model or self.model or None,
                          load_model=not args.no_model, relay=args.relay, compression=compression,
                          micro_batch=args.micro_batch, group=True if args.throughput else None)
        show(session())

    def _status(self, args, cell):
        show(session())  # the panel lists `%bloombee serve` servers and their requests too

    def _disconnect(self, args, cell):
        _stop_servers()
        print("disconnected" if session().disconnect() else "not connected")

    def _host(self, args, cell):
        from ..cluster.swarm import host, swarm, unhost
        from ..shipped import default_model_path

        s = session()
        cluster = s.require_cluster()
        model = args.model or s.model_path or self.model or str(default_model_path())
        workers = _worker_addresses(cluster, args.workers)
        if args.stop:
            gone = unhost(cluster, model, workers)
            print(f"stopped hosting {len(gone)} spans of {model}")
        else:
            host(model, cluster, workers=workers, layers_per_worker=args.layers)
        show(swarm(cluster))

    def _swarm(self, args, cell):
        from ..cluster.swarm import swarm

        view = swarm(session().require_cluster())
        show(view)
        self._store(args.out, view)

    def _profile(self, args, cell):
        from .figures import link_map

        s = session()
        profile = s.measure(progress=True)
        show(profile)
        self._show_figure(link_map(profile, s.plan, s.model.link_codecs() if s.model is not None else None))
        self._store(args.out, profile)

    def _plan(self, args, cell):
        from ..plan import Workload

        s = session()
        s.require_model()
        workload = Workload(batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                            objective=args.objective or self.objective)
        profile = s.ensure_profile()
        if self.live:
            from .plan_widget import PlanWidget

            s.plan_widget = PlanWidget(profile, workload, model=s.model, planner=args.planner)
            show(s.plan_widget)
            self._store(args.out, s.plan_widget)
        else:
            from .plan_widget import static_plan

            print(f"(static view: {why_static() or 'display mode is static'})")
            self._store(args.out, static_plan(profile, workload, args.planner, s.model.chain.relay))

    def _links(self, args, cell):
        from . import figures

        s = session()
        s.require_model()
        build = figures.link_map if args.view == "graph" else figures.link_heatmap
        profile = s.ensure_profile()
        self._show_figure(build(profile, s.plan or _placed_plan(s.model, profile), s.model.link_codecs()))

    def _generate(self, args, cell):
        from .generation import generate_text

        if cell is None:
            raise UsageError("generate is a cell magic: put `%%bloombee generate` on the first line, the prompt below")
        if not args.speculative and (args.draft or args.tree != "auto"):
            raise UsageError("--draft and --tree go with --speculative")
        prompt = cell.strip("\n")
        if not prompt.strip():
            raise UsageError("the cell body is the prompt, and it is empty")
        s = session()
        result = generate_text(s.require_model(), s.require_tokenizer(), prompt,
                               max_new_tokens=args.max_new_tokens or self.max_new_tokens,
                               temperature=self.temperature if args.temperature is None else args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed, live=self.live,
                               speculative=args.speculative, draft=args.draft, tree_widths=args.tree)
        s.last_generation = result
        self._store(args.out, result)

    def _chat(self, args, cell):
        from transformers import TextStreamer

        from ..generate.chat import Chat

        if cell is None or not cell.strip():
            raise UsageError("chat is a cell magic: `%%bloombee chat` on the first line, your message below")
        s = session()
        model, tok = s.require_model(), s.require_tokenizer()
        if s.chat is None or args.reset or args.system is not None or s.chat.model is not model:
            if s.chat is not None:
                s.chat.close()
            try:
                s.chat = Chat(model, tok, system=args.system)
            except ValueError as exc:  # no chat template
                raise UsageError(str(exc)) from None
        s.chat.generate_kwargs["max_new_tokens"] = args.max_new_tokens or self.max_new_tokens
        s.chat.say(cell.strip(), streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))

    def _serve(self, args, cell):
        from .. import serve as http

        if args.stop:
            stopped = session().stop_servers(args.port)
            print(f"stopped serving on port {', '.join(map(str, stopped))}" if stopped else "no server is running")
            return
        settings = http.ServeSettings(api_keys=tuple(args.api_key), rate_per_minute=args.rate_limit)
        server = session().serve(host=args.host, port=8000 if args.port is None else args.port, settings=settings)
        show(server)
        self._store(args.out, server)

    def _show_figure(self, fig) -> None:
        from .figures import live
        from .frontend import show_figure

        show(live(fig)) if self.live else show_figure(fig)


def _stop_servers() -> None:
    """`%bloombee serve` servers must not outlive the model they serve (disconnect, or a connect replacing it)."""
    for port in session().stop_servers():
        print(f"stopped serving on port {port}")


def _worker_addresses(cluster, names: list[str] | None) -> list[str] | None:
    """Worker names or addresses -> addresses (None: every worker)."""
    if not names:
        return None
    by_name = {str(w.get("name")): a for a, w in cluster.workers().items()}
    unknown = [n for n in names if n not in by_name and n not in by_name.values()]
    if unknown:
        raise UsageError(f"no worker named {', '.join(unknown)}; the cluster has {', '.join(sorted(by_name))}")
    return [by_name.get(n, n) for n in names]


def _placed_plan(model, profile):
    """The chain the model runs now (e.g. the default even split), priced as a plan, so the link
    map can draw it; ``None`` when a stage's worker is not in the profile."""
    from ..plan import ChainStage, Workload, evaluate_chain

    names = {w.address: w.name for w in profile.workers}
    if any(st.worker not in names for st in model.placement.stages):
        return None
    chain = [ChainStage(names[st.worker], st.start, st.end) for st in model.placement.stages]
    try:
        return evaluate_chain(profile, Workload(), chain, 1, method="current placement")
    except Exception:  # noqa: BLE001 - a what-if profile may not fit the current spans; draw without a chain
        return None

