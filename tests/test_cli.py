"""The multi-machine path as users run it: a scheduler and `bloombee-nb worker` processes from the shell."""

import json
import os
import subprocess
import sys

import pytest
import torch

import bloombee_nb as bb
from tests.conftest import padded_batch
from tests.helpers import wait_for

BIN = os.path.join(os.path.dirname(sys.executable), "bloombee-nb")

pytestmark = pytest.mark.slow  # real processes: schedulers, workers, `bloombee-nb generate/chat`


@pytest.fixture
def scheduler(tmp_path):
    sched_file = tmp_path / "scheduler.json"
    proc = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                             "--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sched_file.exists, what="the scheduler file")
        yield json.loads(sched_file.read_text())["address"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_workers_started_from_the_command_line_generate_exactly(scheduler, checkpoints, reference, tmp_path):
    workers = [subprocess.Popen([BIN, "worker", scheduler, "--name", f"cli-{i}", "--listen", "127.0.0.1"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        with bb.connect(scheduler) as cluster:
            cluster.wait_for_workers(2, timeout_s=60)
            assert sorted(w["name"] for w in cluster.workers().values()) == ["cli-0", "cli-1"]
            model = bb.DistributedModelForCausalLM.from_pretrained(checkpoints["qwen2"], cluster=cluster)
            assert len({s.worker for s in model.placement.stages}) == 2
            ids, mask = padded_batch([3, 8, 5], seed=11)
            want = reference["qwen2"].generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
            got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
            assert torch.equal(got, want)
            model.close()
    finally:
        for w in workers:
            w.terminate()  # SIGTERM: the worker closes itself cleanly
        codes = [w.wait(30) for w in workers]
    assert codes == [0, 0]
    assert "joined " + scheduler in workers[0].stdout.read()


def test_generate_command_uses_the_shipped_model_by_default():
    """The README's run command: no --model means the shipped tiny model on an embedded cluster."""
    out = subprocess.run([BIN, "generate", "--workers", "2", "--max-new-tokens", "12", "def fibonacci(n):"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tiny-llama on 2 stages: layers 0–2, layers 3–5" in out.stderr
    assert "tokens/s" in out.stderr
    text = out.stdout.strip()
    assert text.startswith("def fibonacci(n):") and len(text) > len("def fibonacci(n):") + 5


def test_worker_host_takes_a_model_and_an_address_there_says_use_listen():
    out = subprocess.run([BIN, "worker", "tcp://127.0.0.1:1", "--host", "127.0.0.1"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "--listen 127.0.0.1" in out.stderr


TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_streams_replies_that_equal_transformers_and_keeps_the_conversation(tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bloombee_nb.shipped import default_model_path

    folder = tmp_path / "chat-model"
    shutil.copytree(default_model_path(), folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    out = subprocess.run([BIN, "chat", "--model", str(folder), "--workers", "2", "--max-new-tokens", "6"],
                         input="def add(a, b):\nand subtract?\n", capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "def add(a, b):"}], add_generation_prompt=True,
                                      tokenize=False), add_special_tokens=False, return_tensors="pt")["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    first = tok.decode(ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:],
                       skip_special_tokens=True)
    turns = out.stdout.split("> ")
    assert len(turns) == 4 and first.strip() in turns[1], out.stdout     # prompt, reply 1, reply 2, EOF
    assert turns[2].strip(), out.stdout


def test_chat_without_a_chat_template_says_what_to_give(tmp_path):
    from bloombee_nb.shipped import default_model_path

    out = subprocess.run([BIN, "chat", "--model", str(default_model_path())], input="", capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "no chat template" in out.stderr
