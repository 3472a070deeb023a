"""The official openai client against a real server: exact greedy text, streaming, chat, sampling."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai

from tests.serve.conftest import greedy_reference

PROMPT = "def fibonacci(n):"


def client(server, key="none"):
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0)


def test_models_lists_the_served_model(start):
    server = start()
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    assert client(server).models.retrieve("tiny-llama").owned_by == "bloombee_nb"


def test_greedy_completion_is_exact_against_transformers(start, tokenizer, hf_model):
    server = start()
    got = client(server).completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=24, temperature=0)
    want, n = greedy_reference(hf_model, tokenizer(PROMPT)["input_ids"], 24, tokenizer)
    assert got.choices[0].text == want and len(want) > 10
    assert got.choices[0].finish_reason == ("length" if n == 24 else "stop")
    assert got.usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"]) and got.usage.completion_tokens == n
    assert got.usage.total_tokens == got.usage.prompt_tokens + n


def test_streaming_completion_sends_the_same_text_in_pieces(start, tokenizer, hf_model):
    server = start()
    chunks = list(client(server).completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=24, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
    want, n = greedy_reference(hf_model, tokenizer(PROMPT)["input_ids"], 24, tokenizer)
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == want and len([p for p in pieces if p]) > 3     # token by token, not one lump
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == n


def test_concurrent_requests_are_concurrent_sessions_each_exact(start, tokenizer, hf_model):
    server = start()
    prompts = ["import os", "class Foo:", "def main():", "for i in range("]
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: client(server).completions.create(model="tiny-llama", prompt=p, max_tokens=16,
                                                                       temperature=0).choices[0].text, prompts))
    assert got == [greedy_reference(hf_model, tokenizer(p)["input_ids"], 16, tokenizer)[0] for p in prompts]
    assert server.app.state.bloombee.activity.served == len(prompts)


def test_chat_uses_the_tokenizers_template_streaming_and_not(start, chat_tokenizer, hf_model):
    server = start(tok=chat_tokenizer)
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    text = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = chat_tokenizer(text, add_special_tokens=False)["input_ids"]
    want, n = greedy_reference(hf_model, ids, 20, chat_tokenizer)
    c = client(server)
    got = c.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=20, temperature=0)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    assert got.usage.completion_tokens == n
    chunks = list(c.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=20, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want


def test_stop_strings_end_the_text_before_them(start, tokenizer, hf_model):
    server = start()
    full, _ = greedy_reference(hf_model, tokenizer(PROMPT)["input_ids"], 24, tokenizer)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = full[:full.index(stop)]
    c = client(server)
    got = c.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "@@@"])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop,
                                    stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == cut


def test_seeded_sampling_repeats_and_n_gives_n_choices(start):
    c = client(start())
    ask = dict(model="tiny-llama", prompt=PROMPT, max_tokens=12, temperature=0.8, top_p=0.9, n=3, seed=7)
    a, b = c.completions.create(**ask), c.completions.create(**ask)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert [x.index for x in a.choices] == [0, 1, 2] and len({x.text for x in a.choices}) > 1
    assert 3 <= a.usage.completion_tokens <= 3 * 12 and a.usage.prompt_tokens > 0
    streamed = ["", "", ""]
    for chunk in c.completions.create(**ask, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == [x.text for x in a.choices]        # the same draws, streamed choice by choice
    other = c.completions.create(**{**ask, "seed": 8})
    assert [x.text for x in other.choices] != [x.text for x in a.choices]
