"""The shipped tiny model on the session's 3-worker cluster, served by real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import bloombee_nb as bb
from bloombee_nb import serve
from bloombee_nb.shipped import default_model_path

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def served_model(cluster):
    """Placed per module and freed after it: other tests on the session's cluster never see these spans."""
    model = bb.DistributedModelForCausalLM.from_pretrained(default_model_path(), cluster=cluster)
    yield model
    model.close()


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="session")
def chat_tokenizer():
    """The shipped tokenizer with a chat template (the shipped one has none)."""
    tok = AutoTokenizer.from_pretrained(default_model_path())
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def hf_model():
    """The same checkpoint in plain transformers, in this process."""
    return AutoModelForCausalLM.from_pretrained(default_model_path()).eval()


@pytest.fixture
def start(served_model, tokenizer):
    """start(**kwargs) -> a running Server on a free port; every one is stopped after the test."""
    servers = []

    def start_server(tok=None, settings=None, tls=None, name=None):
        server = serve.serve(served_model, tok or tokenizer, name, port=0, settings=settings, tls=tls)
        servers.append(server)
        return server

    yield start_server
    for s in servers:
        s.stop()


def greedy_reference(hf_model, ids: list[int], max_new_tokens: int, tok) -> tuple[str, int]:
    """What plain transformers generates greedily: (text, generated tokens)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id)
    new = out[0, x.shape[1]:].tolist()
    if tok.eos_token_id in new:  # generate pads after the end of sequence
        new = new[:new.index(tok.eos_token_id) + 1]
    return tok.decode(new, skip_special_tokens=True), len(new)
