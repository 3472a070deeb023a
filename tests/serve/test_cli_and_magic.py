"""`bloombee-nb serve` as a real process, and `%bloombee serve` in a real IPython shell."""

from __future__ import annotations

import openai
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from bloombee_nb.notebook import session
from bloombee_nb.shipped import default_model_path
from tests.conftest import BIN, start_process
from tests.serve.test_openai_client import PROMPT


@pytest.mark.slow  # a real `bloombee-nb serve` process
def test_serve_command_answers_openai_clients_then_exits_on_sigterm(tokenizer):
    proc, url = start_process([BIN, "serve", "--workers", "2", "--port", "0", "--api-key", "secret", "--throughput"],
                              r"serving tiny-llama at (\S+)", timeout_s=180)
    try:
        c = openai.OpenAI(base_url=url, api_key="secret", max_retries=0)
        got = c.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0)
        assert got.usage.completion_tokens >= 1 and got.choices[0].text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="guess", max_retries=0).models.list()
    finally:
        proc.terminate()
        code = proc.wait(60)
    assert code == 0



@pytest.mark.slow  # a real `bloombee-nb serve` process
def test_serve_command_on_a_running_scheduler(cluster, tokenizer):
    """--scheduler: the server is one more client of an existing cluster (here the session's)."""
    proc, url = start_process([BIN, "serve", "--scheduler", cluster.address, "--port", "0",
                               "--served-model-name", "pooled"], r"serving pooled at (\S+)", timeout_s=180)
    try:
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["pooled"]
        assert c.completions.create(model="pooled", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    finally:
        proc.terminate()
        code = proc.wait(60)
    assert code == 0

@pytest.fixture
def ip(cluster, served_model, tokenizer):
    """A shell whose notebook session holds the session's model (connected from Python, as the
    session's docstring allows), so no second cluster is started."""
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "bloombee_nb")
    shell.run_line_magic("config", "BloombeeMagics.display = 'static'")
    s = session()
    s.cluster, s.model, s.tokenizer, s.model_path = cluster, served_model, tokenizer, default_model_path()
    yield shell
    s.stop_servers()
    s.cluster = s.model = s.tokenizer = s.model_path = None   # the fixtures own them: no disconnect
    shell.run_line_magic("unload_ext", "bloombee_nb")


def test_magic_serves_the_notebooks_model_in_the_background(ip, capsys):
    ip.run_line_magic("bloombee", "serve --port 0 --api-key k --out srv")
    server = ip.user_ns["srv"]
    assert server.running and f"tiny-llama at {server.url} (running)" in capsys.readouterr().out
    c = openai.OpenAI(base_url=server.url, api_key="k", max_retries=0)
    assert c.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    ip.run_line_magic("bloombee", "status")
    assert f"tiny-llama at {server.url} (running): 1 served" in capsys.readouterr().out
    ip.run_line_magic("bloombee", f"serve --stop --port {server.port}")
    assert f"stopped serving on port {server.port}" in capsys.readouterr().out and not server.running
    ip.run_line_magic("bloombee", "serve --stop")
    assert "no server is running" in capsys.readouterr().out


def test_magic_without_a_model_says_what_to_do(ip):
    session().model = None
    with pytest.raises(UsageError, match="no model is placed"):
        ip.run_line_magic("bloombee", "serve --port 0")



@pytest.mark.slow  # CLI and servers (5 s)
def test_disconnect_stops_the_servers_first(ip, capsys):
    s = session()
    s.cluster = s.model = s.tokenizer = None     # the fixtures' cluster and model are not the notebook's to close
    ip.run_line_magic("bloombee", "connect local --workers 1")
    ip.run_line_magic("bloombee", "serve --port 0 --out srv")
    server = ip.user_ns["srv"]
    ip.run_line_magic("bloombee", "disconnect")
    out = capsys.readouterr().out
    assert f"stopped serving on port {server.port}" in out and out.rstrip().endswith("disconnected")
    assert not server.running
