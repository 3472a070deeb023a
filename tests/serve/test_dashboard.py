"""Serving made visible: the `%bloombee status` panel and the Dask dashboard's /bloombee/serve page,
read after real requests from the openai client to a real server on the session's cluster."""

from __future__ import annotations

import json
import urllib.request

import openai

from bloombee_nb.notebook.state import NotebookSession
from bloombee_nb.serve import ServeSettings
from bloombee_nb.serve.activity import Activity
from bloombee_nb.serve.dashboard import TOPIC, latest
from bloombee_nb.shipped import default_model_path
from tests.helpers import wait_for
from tests.serve.test_openai_client import PROMPT


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def board(server) -> dict:
    """The dashboard's JSON entry for ``server`` (None until it has one)."""
    servers = json.loads(fetch(server.dashboard_link + ".json"))["servers"]
    return next((s for s in servers if s["url"] == server.url), None)


def test_status_panel_and_dashboard_show_the_requests_served(cluster, served_model, tokenizer):
    s = NotebookSession(cluster=cluster, model=served_model, tokenizer=tokenizer, model_path=default_model_path())
    server = s.serve(port=0, settings=ServeSettings(api_keys=("alpha-key", "beta-key")))
    try:
        a = openai.OpenAI(base_url=server.url, api_key="alpha-key", max_retries=0)
        b = openai.OpenAI(base_url=server.url, api_key="beta-key", max_retries=0)
        tokens = a.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0).usage
        tokens = tokens.completion_tokens
        stream = list(a.completions.create(model="tiny-llama", prompt="import os", max_tokens=8, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
        tokens += stream[-1].usage.completion_tokens
        tokens += b.completions.create(model="tiny-llama", prompt="x = ", max_tokens=5, temperature=0).usage \
            .completion_tokens

        snap = server.snapshot()
        assert (snap.served, snap.generating, snap.queued, snap.tokens) == (3, 0, 0, tokens)
        assert snap.tokens_per_s > 0                     # tokens counted step by step, within the rate window
        assert {(k.who, k.requests) for k in snap.by_key} == {("key 1", 2), ("key 2", 1)}

        # the status panel: HTML and text from one mimebundle, as `%bloombee status` displays it
        bundle = s._repr_mimebundle_()
        assert "serving over HTTP" in bundle["text/html"] and server.url in bundle["text/html"]
        assert "key 1" in bundle["text/html"] and server.dashboard_link in bundle["text/html"]
        assert "alpha-key" not in bundle["text/html"]    # keys never leave the server
        assert f"tiny-llama at {server.url} (running): 3 served" in bundle["text/plain"]

        # the Dask dashboard: the scheduler's own HTTP server, fed by Client.log_event
        assert server.dashboard_link.startswith(cluster.client.dashboard_link.rsplit("/status", 1)[0])
        wait_for(lambda: (board(server) or {}).get("served") == 3, what="the dashboard to count 3 served")
        entry = board(server)
        assert entry["running"] and entry["tokens"] == tokens
        assert {(k["who"], k["requests"], k["tokens"]) for k in entry["by_key"]} == \
            {(k.who, k.requests, k.tokens) for k in snap.by_key}
        page = fetch(server.dashboard_link)
        assert "requests served over HTTP" in page and server.url in page and "key 2" in page
        assert any(m.get("url") == server.url for _, m in cluster.client.get_events(TOPIC))
    finally:
        assert s.stop_servers() == [server.port]
    assert not s.running_servers() and "serving" not in s._serving_html()
    wait_for(lambda: board(server)["running"] is False, what="a snapshot saying it stopped")   # the last snapshot says it stopped


def test_requests_waiting_and_refused_are_counted_per_caller():
    act = Activity()
    act.admitted("key 1"), act.started(), act.admitted("key 1")
    act.refuse("key 2")
    act.generated("key 1", 4)
    snap = act.snapshot(server="s", model="m", url="u", running=True, admitted=2)
    assert (snap.generating, snap.queued, snap.refused, snap.tokens) == (1, 1, 1, 4)
    assert {(k.who, k.requests, k.tokens, k.refused) for k in snap.by_key} == {("key 1", 2, 4, 0),
                                                                              ("key 2", 0, 0, 1)}
    assert "1 generating, 1 queued" in snap.text()


def test_the_dashboard_keeps_the_newest_snapshot_of_each_server():
    def snap(server, served, running=True):
        a = Activity()
        return a.snapshot(server=server, model="m", url=server, running=running, admitted=0).to_dict() | \
            {"served": served}

    events = [(1.0, snap("a", 1)), (2.0, snap("b", 5)), (3.0, snap("a", 2, running=False)), (4.0, "other")]
    got = latest(events)
    assert [(s.server, s.served, s.running) for s in got] == [("b", 5, True), ("a", 2, False)]
