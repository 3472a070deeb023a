"""The generation panel: tokens stream in as they are produced, with live speed and per-stage time.

A transformers streamer hands each decoded piece of text to a :class:`GenerationPanel`; the panel
redraws at most every ``interval_s`` (a few times a second), reading the session's step traces,
so a fast model does not flood the kernel with widget messages. Without live widgets the text is
printed as it comes and a summary follows::

    result = generate_text(model, tokenizer, "def fibonacci(n):", max_new_tokens=32)
    result.text, result.tokens_per_s, result.trace          # a GenerationResult (renders as HTML)

With ``speculative=True`` a draft model on the client proposes token trees that the chain verifies
(``model.generate(..., assistant_model=draft)``); the panel then shows the acceptance rate, tokens
per traversal of the chain and the tree size chosen for the link.

When a worker is lost mid-generation the session re-places the spans and replays its history
(``generate/session.py``); the panel shows a "⏸ paused … recovered in X s" line per recovery.
"""

from __future__ import annotations

import html
import sys
import time
from dataclasses import dataclass

import numpy as np

from transformers import TextStreamer

from ..cluster.trace import StepTrace

PLAIN = "— (plain decoding; speculative: %%bloombee generate --speculative)"


@dataclass(frozen=True)
class TraceSummary:
    """Numbers read off a session's step traces (step 0 is the prefill; the rest are decode steps)."""

    steps: int
    prefill_s: float
    decode_steps: int
    relay: str                          # "chain": stage → stage; "star": the client relays every hop
    step_wall_s: float                  # mean decode step, client clock
    stage_compute_s: tuple[float, ...]  # mean per decode step, per stage (worker clock)
    stage_wall_s: tuple[float, ...]     # star only: mean round trip per stage (client clock); chain: ()
    bytes_sent: int                     # frame bytes the client sent, all steps
    bytes_received: int                 # frame bytes the client received
    hidden_bytes: int                   # hidden-state bytes over every hop of every step, uncompressed
    wire_bytes: int = 0                 # the same as they crossed the links (compressed where it paid)

    @classmethod
    def of(cls, traces: list[StepTrace]) -> "TraceSummary":
        decode = traces[1:]
        relay = getattr(traces[-1], "relay", "star") if traces else "star"
        mean = lambda rows: tuple(float(np.mean(col)) for col in zip(*rows)) if rows else ()
        return cls(len(traces), traces[0].wall_s if traces else 0.0, len(decode), relay,
                   float(np.mean([t.wall_s for t in decode])) if decode else 0.0,
                   mean([t.stage_compute_s for t in decode]),
                   mean([t.stage_wall_s for t in decode]) if relay == "star" else (),
                   sum(t.bytes_sent for t in traces), sum(t.bytes_received for t in traces),
                   sum(t.raw_bytes for t in traces), sum(t.wire_bytes for t in traces))


@dataclass(frozen=True)
class GenerationResult:
    """One ``%%bloombee generate``: the text and what it cost."""

    prompt: str
    text: str                  # the continuation only
    new_tokens: int
    elapsed_s: float           # prefill + decode, client clock
    stage_names: tuple[str, ...]
    trace: TraceSummary
    compression: str = "off"   # the chain's codec for hidden-state frames
    speculation: object = None  # a SpeculationSummary when a draft proposed token trees
    recoveries: tuple = ()      # RecoveryEvents: workers lost during the generation, spans re-placed

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def __repr__(self):
        return (f"<GenerationResult {self.new_tokens} tokens in {self.elapsed_s:.2f} s "
                f"({self.tokens_per_s:.1f} tokens/s): {self.text[:60]!r}>")

    def _repr_html_(self):
        stats = stats_html(self.new_tokens, self.elapsed_s, self.stage_names, self.trace, self.compression,
                           speculation=self.speculation, recoveries=self.recoveries)
        return (f"<div class='bloombee-result'><pre class='bloombee-gen-text'><b>{html.escape(self.prompt)}</b>"
                f"{html.escape(self.text)}</pre>{stats}</div>")


def speculation_html(spec) -> str:
    """Acceptance rate, tokens per traversal and the tree, of a SpeculationSummary (None: plain decoding)."""
    if spec is None or not spec.rounds:
        return f"acceptance rate: {PLAIN}"
    depth = " / ".join(f"{a:.0%}" for a in spec.acceptance_by_depth) or "—"
    tree = ",".join(map(str, spec.last_widths)) or "none"
    return (f"acceptance rate: <b>{spec.acceptance_rate:.0%}</b> (per depth {depth}) · "
            f"<b>{spec.tokens_per_traversal:.2f} tokens per traversal</b> · {spec.speculative_rounds} of "
            f"{spec.rounds} traversals speculative, {spec.mean_tree_tokens:.1f} tree tokens each · last tree: {tree}")


def recovery_html(recoveries) -> str:
    """One line per recovery: the pause, what was lost, where the spans went."""
    return "".join(f"<div class='bloombee-recovery'>⏸ {html.escape(e.describe())}</div>" for e in recoveries)


def stats_html(new_tokens: int, elapsed_s: float, stage_names, t: TraceSummary, compression: str = "off",
               done: bool = True, speculation=None, recoveries=()) -> str:
    """Speed, bytes on the wire and compression, speculation, and a per-stage table."""
    rate = new_tokens / elapsed_s if elapsed_s > 0 else 0.0
    ratio = (f"{t.hidden_bytes / t.wire_bytes:.2f}× ({html.escape(compression)})"
             if compression != "off" and t.wire_bytes else "off (connect with --compression auto|CODEC)")
    computes = t.stage_compute_s or (0.0,) * len(stage_names)
    walls = [f"{w * 1e3:.2f}" for w in t.stage_wall_s] or ["—"] * len(stage_names)   # chain: no per-stage wall
    rows = "".join(f"<tr><td>{i + 1}</td><td>{html.escape(str(n))}</td><td>{c * 1e3:.2f}</td><td>{w}</td></tr>"
                   for i, (n, c, w) in enumerate(zip(stage_names, computes, walls)))
    return (f"<div class='bloombee-gen-stats'><b>{new_tokens} tokens</b> in {elapsed_s:.2f} s · "
            f"<b>{rate:.1f} tokens/s</b>{'' if done else ' (live)'} · prefill {t.prefill_s * 1e3:.1f} ms · "
            f"decode step {t.step_wall_s * 1e3:.2f} ms ({t.relay} relay)<br>"
            f"hidden states on the wire: {t.wire_bytes / 1024:.1f} KiB over all hops ({t.hidden_bytes / 1024:.1f} KiB "
            f"uncompressed) · client's links: {t.bytes_sent / 1024:.1f} KiB sent, {t.bytes_received / 1024:.1f} KiB "
            f"received · compression ratio: {ratio}<br>{speculation_html(speculation)}{recovery_html(recoveries)}"
            f"<table><tr><th>stage</th><th>worker</th><th>compute ms/step</th><th>round trip ms/step</th></tr>"
            f"{rows}</table></div>")


class GenerationPanel:
    """Where generations stream: live widgets, or (``live=False``) plain printed text.

        panel = GenerationPanel(live=True); display(panel)
        result = panel.run(model, tokenizer, "def fibonacci(n):", max_new_tokens=32)
    """

    def __init__(self, *, live: bool, interval_s: float = 0.25):
        self.live, self.interval_s = live, interval_s
        self.prompt, self.text, self.stage_names, self.new_tokens, self.compression = "", "", [], 0, "off"
        self.updates, self.result, self.recoveries = 0, None, ()
        self.t0 = self._last = 0.0
        if live:
            import ipywidgets as W

            from . import figures

            self.text_view = W.HTML(self._text_html())
            self.stats_view = W.HTML("<i>waiting for the first token…</i>")
            self.figure = figures.live(figures.stage_step_times([], (), (), 0.0))
            self.widget = W.VBox([self.text_view, self.stats_view, self.figure]).add_class("bloombee-generation")

    def run(self, model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
            top_k: int = 50, top_p: float = 1.0, seed: int | None = None, speculative: bool = False,
            draft=None, tree_widths: tuple[int, ...] | str = "auto") -> GenerationResult:
        """Generate from ``prompt`` on the distributed model, streaming here.

        ``temperature=0`` decodes greedily; otherwise samples with ``top_k``/``top_p``.
        ``speculative``: a draft model (``draft``: a model or a path; default: the shipped draft for
        the shipped model) proposes token trees of ``tree_widths`` ("auto": chosen for the link).
        """
        import torch

        ids = tokenizer(prompt, return_tensors="pt")
        self.compression = model.chain.compression or "off"
        self._start(prompt, [_worker_name(model, st.worker) for st in model.placement.stages])
        sampling = (dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if temperature > 0
                    else dict(do_sample=False))
        if seed is not None:
            torch.manual_seed(seed)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        spec = {}
        if speculative:
            spec = dict(assistant_model=resolve_draft(model, tokenizer, draft), tree_widths=tree_widths)
        room = _tree_room() if speculative else 0   # a tree's tokens on top of the output
        with model.inference_session(max_length=ids["input_ids"].shape[1] + max_new_tokens + room) as session:
            streamer = _PanelStreamer(tokenizer, self, session)
            out = model.generate(**ids, session=session, max_new_tokens=max_new_tokens, streamer=streamer,
                                 pad_token_id=pad, **sampling, **spec)
            traces, rounds = list(session.traces), list(session.rounds)
            self.recoveries = tuple(session.recoveries)
        elapsed = time.perf_counter() - self.t0
        new = out[0, ids["input_ids"].shape[1]:]
        self.result = GenerationResult(prompt, tokenizer.decode(new, skip_special_tokens=True), int(new.numel()),
                                       elapsed, tuple(self.stage_names), TraceSummary.of(traces), self.compression,
                                       _speculation(rounds) if speculative else None, self.recoveries)
        return self.result

    def _start(self, prompt: str, stage_names: list[str]) -> None:
        self.prompt, self.text, self.stage_names, self.new_tokens = prompt, "", stage_names, 0
        self.recoveries = ()
        self.t0 = self._last = time.perf_counter()
        if self.live:
            self.text_view.value = self._text_html()
        else:
            print(prompt, end="", flush=True)

    def _text_html(self) -> str:
        return (f"<pre class='bloombee-gen-text' style='white-space:pre-wrap'><b>{html.escape(self.prompt)}</b>"
                f"{html.escape(self.text)}</pre>")

    def push(self, text: str, tokens: int, traces, done: bool = False, rounds=(), recoveries=(),
             stage_names=None) -> None:
        """Add streamed text; redraw if ``interval_s`` passed since the last redraw (always when done).
        A recovery since the last push redraws at once (printed on stderr without widgets)."""
        self.text += text
        self.new_tokens += tokens
        moved = len(recoveries) > len(self.recoveries)
        if moved:
            fresh, self.recoveries = recoveries[len(self.recoveries):], tuple(recoveries)
            self.stage_names = list(stage_names or self.stage_names)
            if not self.live:
                print("".join(f"\n⏸ {e.describe()}" for e in fresh), file=sys.stderr, flush=True)
        if not self.live:
            print(text, end="\n" if done else "", flush=True)
            return
        now = time.perf_counter()
        if done or moved or now - self._last >= self.interval_s:
            self._last = now
            self._redraw(list(traces), done, list(rounds))

    def _redraw(self, traces, done: bool, rounds=()) -> None:
        from . import figures

        self.updates += 1
        t = TraceSummary.of(traces)
        self.text_view.value = self._text_html()
        self.stats_view.value = stats_html(self.new_tokens, time.perf_counter() - self.t0, self.stage_names, t,
                                           self.compression, done, _speculation(rounds) if rounds else None,
                                           self.recoveries)
        if t.decode_steps:
            figures.refresh(self.figure, figures.stage_step_times(self.stage_names, t.stage_compute_s, t.stage_wall_s,
                                                                  t.step_wall_s))

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs) if self.live else {"text/plain": ""}


class _PanelStreamer(TextStreamer):
    """transformers' TextStreamer, feeding a panel instead of stdout (and counting new tokens)."""

    def __init__(self, tokenizer, panel: GenerationPanel, session):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.panel, self.session, self._pending = panel, session, 0

    def put(self, value):
        if not self.next_tokens_are_prompt:
            self._pending += value.numel()
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        names = None
        if len(self.session.recoveries) > len(self.panel.recoveries):  # the spans moved: new stage names
            names = [_worker_name_or(self.session.model, st.worker) for st in self.session.chain.placement.stages]
        self.panel.push(text, self._pending, self.session.traces, done=stream_end, rounds=self.session.rounds,
                        recoveries=tuple(self.session.recoveries), stage_names=names)
        self._pending = 0


def generate_text(model, tokenizer, prompt: str, *, live: bool = False, interval_s: float = 0.25,
                  **generate_kwargs) -> GenerationResult:
    """Show a :class:`GenerationPanel` and run one generation in it (``generate_kwargs``: see ``run``)."""
    from .frontend import show

    panel = GenerationPanel(live=live, interval_s=interval_s)
    if live:
        show(panel)
    result = panel.run(model, tokenizer, prompt, **generate_kwargs)
    if not live:
        show(_Summary(result))
    return result


class _Summary:
    """The static fallback's closing line: the stats of a result, without repeating its text."""

    def __init__(self, result: GenerationResult):
        self.result = result

    def __repr__(self):
        r = self.result
        spec = r.speculation
        accepted = (f", acceptance rate {spec.acceptance_rate:.0%}, "
                    f"{spec.tokens_per_traversal:.2f} tokens per traversal" if spec is not None and spec.rounds else "")
        moved = "".join(f"\n# ⏸ {e.describe()}" for e in r.recoveries)
        return (f"# {r.new_tokens} tokens in {r.elapsed_s:.2f} s ({r.tokens_per_s:.1f} tokens/s), "
                f"{r.trace.bytes_sent + r.trace.bytes_received} bytes on the wire{accepted}{moved}")

    def _repr_html_(self):
        r = self.result
        return stats_html(r.new_tokens, r.elapsed_s, r.stage_names, r.trace, r.compression, speculation=r.speculation,
                          recoveries=r.recoveries)


def _worker_name(model, address: str) -> str:
    info = model.cluster.workers().get(address, {})
    return str(info.get("name", address))


def _worker_name_or(model, address: str) -> str:
    """The name the model remembers (no scheduler call while a generation streams)."""
    return getattr(getattr(model, "deployment", None), "worker_names", {}).get(address) or _worker_name(model, address)


def _tree_room() -> int:
    from ..generate.tree_size import MAX_NODES

    return MAX_NODES


def _speculation(rounds):
    from ..generate.speculative import SpeculationSummary

    return SpeculationSummary.of(rounds)


def resolve_draft(model, tokenizer, draft=None):
    """The draft model for ``model``: ``draft`` itself, a path to load, or (None) the shipped draft
    when ``model`` is the shipped target. Checked against the target's vocabulary and tokenizer."""
    from pathlib import Path

    from ..errors import DraftModelError
    from ..generate.speculative import check_draft, load_draft
    from ..shipped import DRAFT_PATH, TARGET_PATH

    if draft is None:
        if Path(str(model.name_or_path)).resolve() != TARGET_PATH.resolve():
            raise DraftModelError(f"there is no default draft for {model.name_or_path}: pass a small causal LM that "
                                  "shares its tokenizer (%%bloombee generate --speculative --draft PATH)")
        draft = str(DRAFT_PATH)
    draft_tokenizer = None
    if isinstance(draft, (str, Path)):
        draft_tokenizer = _tokenizer_of(str(draft))
        try:
            draft = load_draft(str(draft))
        except (OSError, ValueError) as exc:
            raise DraftModelError(f"cannot load the draft model {draft}: {exc}") from None
    check_draft(model, draft, tokenizer, draft_tokenizer)
    return draft


def _tokenizer_of(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None  # no tokenizer saved with the draft: the vocabulary size is checked instead
