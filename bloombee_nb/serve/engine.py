"""The engine: one OpenAI request → one ``model.generate`` call on the swarm, run on a thread.

Each request is its own inference session (``generate`` opens one sized for prompt + max_tokens);
requests run on a pool of threads, so concurrent requests are concurrent sessions, and their decode
steps merge into one forward at every stage. ``n`` choices are ``n`` rows of one batch.

Everything rides on transformers' generation loop: sampling is a logits processor list
(temperature, top-p, then :class:`SeededSampler`, which draws from the request's own
``torch.Generator`` so a ``seed`` reproduces the same text whatever else runs concurrently — the
global torch seed would be shared by every thread), and :class:`RowTracker` is a stopping
criterion that follows each row's text: stop strings, end of sequence, ``max_tokens``, streaming
deltas and cancellation (a client that hung up) in one place.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from ..errors import BloombeeError
from .errors import ContextLengthError, GenerationFailedError, InvalidRequestError, NoChatTemplateError


@dataclass(frozen=True)
class GenerationSpec:
    """One request, validated and tokenized: what the engine runs."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    n: int = 1                        # choices, decoded as rows of one batch
    stop: tuple[str, ...] = ()        # generation ends before the first of these strings
    seed: int | None = None


@dataclass(frozen=True)
class Delta:
    """New text of one choice while it streams; ``finish_reason`` is set on its last delta."""

    index: int
    text: str
    finish_reason: str | None = None


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: str                # "stop" (end of sequence or a stop string) or "length"
    tokens: int                       # generated tokens, the one that ended it included


@dataclass(frozen=True)
class Result:
    choices: tuple[Choice, ...]       # the choices that finished (all of them unless cancelled)
    prompt_tokens: int
    cancelled: bool = False           # the client hung up before every choice finished

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)


# ---- text: stop strings and what is safe to stream -------------------------------------------

def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def safe_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be sent now: hold back a tail that may still grow into a stop
    string, and a trailing replacement character (half of a multi-byte character)."""
    end = len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[end - k:end] == s[:k]:
                end -= k
                break
    return end


# ---- transformers plug-ins -------------------------------------------------------------------

class SeededSampler(LogitsProcessor):
    """Samples one token per row from the (already warped) scores with its own generator and leaves
    only that token possible, so greedy selection then picks it: per-request reproducible sampling."""

    def __init__(self, seed: int | None):
        self.generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)                        # [B, V]
        picked = torch.multinomial(probs, 1, generator=self.generator)       # [B, 1]
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picked, 0.0)


class RowTracker(StoppingCriteria):
    """Follows every row's generated tokens and text; ends a row at end of sequence, a stop string
    or ``max_new_tokens``; sends each row's new text to ``emit``; ends all rows when ``cancel`` is set."""

    def __init__(self, tokenizer, spec: GenerationSpec, eos_ids: set[int],
                 emit: Callable[[Delta], None] | None, cancel: threading.Event,
                 progress: Callable[[int], None] | None = None):
        self.tok, self.spec, self.eos, self.emit, self.cancel = tokenizer, spec, eos_ids, emit, cancel
        self.progress = progress                         # told the number of new tokens at every step
        self.tokens: list[list[int]] = [[] for _ in range(spec.n)]
        self.sent = [0] * spec.n                         # characters already emitted per row
        self.choices: list[Choice | None] = [None] * spec.n

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        live = [row for row in range(self.spec.n) if self.choices[row] is None]
        for row in live:
            self._advance(row, int(input_ids[row, -1]))
        if self.progress is not None and live:
            self.progress(len(live))
        done = [c is not None for c in self.choices]
        if self.cancel.is_set():
            done = [True] * self.spec.n
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _advance(self, row: int, token: int) -> None:
        self.tokens[row].append(token)
        ended_by_eos = token in self.eos
        text = self.tok.decode(self.tokens[row][:-1] if ended_by_eos else self.tokens[row], skip_special_tokens=True)
        cut = find_stop(text, self.spec.stop)
        if cut is not None:
            self._finish(row, text[:cut], "stop")
        elif ended_by_eos:
            self._finish(row, text, "stop")
        elif len(self.tokens[row]) >= self.spec.max_new_tokens:
            self._finish(row, text, "length")
        else:
            self._send(row, text[:safe_length(text, self.spec.stop)], None)

    def _finish(self, row: int, text: str, reason: str) -> None:
        self.choices[row] = Choice(row, text, reason, len(self.tokens[row]))
        self._send(row, text, reason)

    def _send(self, row: int, text: str, reason: str | None) -> None:
        new = text[self.sent[row]:]
        if self.emit is not None and (new or reason):
            self.emit(Delta(row, new, reason))
        self.sent[row] = max(self.sent[row], len(text))


# ---- the engine ------------------------------------------------------------------------------

class Engine:
    """Tokenizes requests for ``model`` and runs them (blocking: call :meth:`run` from a thread)."""

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.context_tokens = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
            else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.pad_id = pad

    # -- prompts
    def completion_ids(self, prompt) -> tuple[int, ...]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        elif prompt and all(isinstance(t, int) for t in prompt):
            ids = prompt
        else:
            raise InvalidRequestError("'prompt' must be one string or one list of token ids (this server takes one "
                                      "prompt per request; send several requests, they run concurrently)",
                                      param="prompt")
        return self._checked(ids)

    def chat_ids(self, messages: list[dict]) -> tuple[int, ...]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise NoChatTemplateError(
                f"model {self.name!r} has no chat template in its tokenizer, so chat messages cannot be turned into "
                "a prompt: use /v1/completions with a plain prompt, or serve a checkpoint whose tokenizer_config.json "
                "has a chat_template (tokenizer.chat_template = ...; tokenizer.save_pretrained(path))",
                param="messages")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self._checked(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _checked(self, ids) -> tuple[int, ...]:
        ids = tuple(int(t) for t in ids)
        vocab = int(self.model.config.vocab_size)
        if not ids:
            raise InvalidRequestError("the prompt is empty: send at least one token", param="prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequestError(f"token ids must lie in [0, {vocab})", param="prompt")
        return ids

    def spec(self, prompt_ids: tuple[int, ...], max_tokens: int | None, *, temperature: float, top_p: float,
             n: int, stop: tuple[str, ...], seed: int | None) -> GenerationSpec:
        """The request as a :class:`GenerationSpec`; ``max_tokens=None`` fills the rest of the context."""
        room = self.context_tokens - len(prompt_ids)
        wanted = room if max_tokens is None else max_tokens
        if wanted > room or room < 1:
            raise ContextLengthError(
                f"this model's maximum context length is {self.context_tokens} tokens; the prompt has "
                f"{len(prompt_ids)} tokens and max_tokens asks for {wanted} more: shorten the prompt or lower "
                "max_tokens", param="max_tokens" if max_tokens is not None and room >= 1 else "prompt")
        return GenerationSpec(prompt_ids, wanted, temperature, top_p, n, stop, seed)

    # -- running
    def run(self, spec: GenerationSpec, emit: Callable[[Delta], None] | None = None,
            cancel: threading.Event | None = None, progress: Callable[[int], None] | None = None) -> Result:
        """Generate every choice of ``spec`` (blocks; new text goes to ``emit`` as it comes, the count
        of new tokens to ``progress`` at every step)."""
        cancel = cancel or threading.Event()
        tracker = RowTracker(self.tokenizer, spec, self.eos_ids, emit, cancel, progress)
        if cancel.is_set():
            return Result((), len(spec.prompt_ids), cancelled=True)
        ids = torch.tensor([spec.prompt_ids] * spec.n, dtype=torch.long)   # [n, T]
        try:
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec.max_new_tokens,
                                do_sample=False, logits_processor=_sampling(spec),
                                stopping_criteria=StoppingCriteriaList([tracker]), pad_token_id=self.pad_id)
        except BloombeeError as exc:
            raise GenerationFailedError(f"the swarm could not run this request: {exc}") from exc
        done = tuple(c for c in tracker.choices if c is not None)
        return Result(done, len(spec.prompt_ids), cancelled=len(done) < spec.n)


def _sampling(spec: GenerationSpec) -> LogitsProcessorList:
    """Temperature and top-p warpers, then the request's own sampler (empty for greedy)."""
    if spec.temperature == 0:
        return LogitsProcessorList()
    warpers = [TemperatureLogitsWarper(spec.temperature)] if spec.temperature != 1 else []
    if spec.top_p < 1:
        warpers.append(TopPLogitsWarper(spec.top_p))
    return LogitsProcessorList([*warpers, SeededSampler(spec.seed)])
