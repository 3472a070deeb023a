"""A multi-turn chat whose KV cache stays on the stages.

Each turn renders the whole conversation with the tokenizer's own chat template. When that text
extends what the stages already hold (the earlier turns' tokens, as generated), only the new part
is tokenized and sent: the stages see each token once. When it does not (a template that rewrites
earlier turns, e.g. drops reasoning), the conversation is re-sent in a fresh session — slower, and
still exactly what transformers computes for those tokens. The front ends (``bloombee-nb chat``, a
``%%bloombee chat`` cell) only read lines and print replies.
"""

from __future__ import annotations

import torch


class Chat:
    """``chat = Chat(model, tokenizer); chat.say("Hi")`` -> the assistant's reply, greedy by default.

    ``system``: an optional system message; ``max_length``: positions the session reserves on
    every stage (the whole conversation must fit); ``generate_kwargs`` go to ``model.generate``
    (``max_new_tokens`` defaults to 128, ``do_sample`` to False).
    """

    def __init__(self, model, tokenizer, system: str | None = None, max_length: int = 2048, **generate_kwargs):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; load the instruct model's tokenizer "
                             "(a GGUF file carries its own: AutoTokenizer.from_pretrained(folder, gguf_file=...))")
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.generate_kwargs = {"max_new_tokens": 128, "do_sample": False, **generate_kwargs}
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.session = None
        self.tokens = torch.zeros(1, 0, dtype=torch.long)  # [1, L]: every token of the conversation so far
        self.prompt = self.tokens  # [1, P]: what the last turn generated from
        self.resent = 0  # turns that had to re-send the conversation (the template rewrote history)

    def say(self, text: str, streamer=None) -> str:
        self.messages.append({"role": "user", "content": text})
        ids = self.prompt = self._next_ids()
        out = self.model.generate(ids, session=self.session, streamer=streamer, **self.generate_kwargs)
        reply = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": reply})
        self.tokens = out
        return reply

    def _next_ids(self) -> torch.Tensor:
        """The conversation's tokens for this turn: what the stages hold plus the new part, or all anew."""
        tok = self.tokenizer
        full = tok.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)
        held = tok.decode(self.tokens[0], skip_special_tokens=False) if self.tokens.numel() else None
        if self.session is not None and held is not None and full.startswith(held):
            new = tok(full[len(held):], add_special_tokens=False, return_tensors="pt")["input_ids"]
            return torch.cat([self.tokens, new], dim=1)
        if self.session is not None:  # history rewritten: start over in a fresh session
            self.session.close()
            self.resent += 1
        self.session = self.model.inference_session(max_length=self.max_length)
        return tok(full, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def __enter__(self) -> "Chat":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
