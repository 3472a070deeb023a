"""%bloombee in a real IPython shell: connect, status, profile, plan, generate, disconnect; errors."""

import re

import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from transformers import AutoModelForCausalLM, AutoTokenizer

from bloombee_nb.notebook import session
from bloombee_nb.notebook.magics import build_parser
from bloombee_nb.shipped import default_model_path

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def ip():
    """One shell with the extension loaded and one 2-worker embedded cluster for the module."""
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "bloombee_nb")
    shell.run_line_magic("config", "BloombeeMagics.display = 'static'")
    shell.run_line_magic("bloombee", "connect local --workers 2")
    yield shell
    session().disconnect()
    shell.run_line_magic("unload_ext", "bloombee_nb")


def test_connect_shows_status_with_workers_and_spans(ip, capsys):
    s = session()
    assert len(s.cluster.workers()) == 2 and s.model is not None and s.tokenizer is not None
    ip.run_line_magic("bloombee", "status")
    out = capsys.readouterr().out
    assert "2 workers" in out and "tiny-llama" in out and "profile not measured" in out
    assert "hosts" in s._repr_html_() and "layers 0–" in s._repr_html_()


def test_generate_streams_the_same_tokens_as_transformers(ip, capsys):
    ip.run_cell_magic("bloombee", "generate --max-new-tokens 12 --out result", PROMPT + "\n")
    printed = capsys.readouterr().out
    result = ip.user_ns["result"]
    tok = AutoTokenizer.from_pretrained(default_model_path())
    ref = AutoModelForCausalLM.from_pretrained(default_model_path()).eval()
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        want = ref.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(want[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert result.text == expected and result.new_tokens == 12
    assert printed.startswith(PROMPT + expected) and "tokens/s" in printed       # streamed, then the summary
    assert result.trace.steps == 12 and len(result.trace.stage_compute_s) == len(session().model.placement.stages)
    assert result.trace.relay == "chain" and result.trace.hidden_bytes > 0
    assert result.trace.bytes_sent > 0 and "bloombee-gen-text" in result._repr_html_()
    assert session().last_generation is result


def test_speculative_generate_is_exact_and_reports_acceptance(ip, capsys):
    # a fixed tree: the automatic size depends on timings, and on a loaded machine it may rightly stay off
    ip.run_cell_magic("bloombee", "generate --speculative --tree 2,2,1 --max-new-tokens 16 --out spec", PROMPT + "\n")
    printed = capsys.readouterr().out
    result = ip.user_ns["spec"]
    assert result.text == transformers_greedy(PROMPT, 16) and result.new_tokens == 16
    s = result.speculation
    assert s.rounds < 16 and s.tokens_per_traversal > 1 and s.speculative_rounds >= 1
    assert "acceptance rate" in printed and "tokens per traversal" in printed         # the static summary line
    assert f"{s.acceptance_rate:.0%}</b>" in result._repr_html_()
    ip.run_cell_magic("bloombee", "generate --speculative --tree 1,1,1 --max-new-tokens 8 --out linear", PROMPT)
    assert ip.user_ns["linear"].speculation.last_widths in ((1, 1, 1), (1, 1), (1,))  # trimmed near the end
    assert ip.user_ns["linear"].text == transformers_greedy(PROMPT, 8)


def transformers_greedy(prompt: str, n: int) -> str:
    tok = AutoTokenizer.from_pretrained(default_model_path())
    ref = AutoModelForCausalLM.from_pretrained(default_model_path()).eval()
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_profile_then_static_plan(ip, capsys):
    ip.run_line_magic("bloombee", "profile --out prof")
    assert ip.user_ns["prof"] is session().profile and len(session().profile.workers) == 2
    ip.run_line_magic("bloombee", "plan --objective throughput --batch 2 --out plan")
    out = capsys.readouterr().out
    plan = ip.user_ns["plan"]
    assert plan.objective == "throughput" and plan.workload.batch == 2
    assert "static view" in out and "<figure: layers along the chain" in out and "<figure: links" in out


def test_plan_widget_when_widgets_are_live(ip):
    ip.run_line_magic("config", "BloombeeMagics.display = 'widgets'")
    try:
        ip.run_line_magic("bloombee", "plan --objective latency")
        w = session().plan_widget
        assert w.plan is not None and w.model is session().model
        assert w.plan.layer_spans[-1][1] == session().model.config.num_hidden_layers
        ip.run_line_magic("bloombee", "links --view heatmap")   # a FigureWidget, shown
    finally:
        ip.run_line_magic("config", "BloombeeMagics.display = 'static'")


def test_links_draw_the_current_placement_when_no_plan_was_made(ip):
    from bloombee_nb.notebook import figures
    from bloombee_nb.notebook.magics import _placed_plan

    s = session()
    profile = s.ensure_profile()
    plan = _placed_plan(s.model, profile)
    names = {w.address: w.name for w in profile.workers}
    assert [st.worker for st in plan.stages] == [names[st.worker] for st in s.model.placement.stages]
    chain = next(t for t in figures.link_map(profile, plan, s.model.link_codecs()).data if t.name == "chain")
    assert len(chain.x) == len(plan.stages) + 2  # client → stages → client


@pytest.mark.parametrize("line, match", [
    ("connect local --workers 0", "at least 1"),
    ("connect local --workers two", "invalid _positive_int value"),
    ("connect tcp://127.0.0.1:1 --workers 2", "only applies to `connect local`"),
    ("connect nowhere", "scheduler address"),
    ("plan --objective fastest", "invalid choice"),
    ("plan --batch", "expected one argument"),
    ("frobnicate", "invalid choice"),
    ("generate", "cell magic"),
    ("status 'unclosed", "cannot parse"),
    ("connect local --compression zip-9", "unknown compressor"),
    ("plan --out 1x", "variable name"),
    ("generate --temperature -1", "must be in"),
    ("generate --speculative --tree 2,0", "positive widths"),
])
def test_wrong_arguments_are_usage_errors(ip, line, match):
    with pytest.raises(UsageError, match=match):
        ip.run_line_magic("bloombee", line)


def test_cell_errors_are_usage_errors(ip):
    with pytest.raises(UsageError, match="prompt, and it is empty"):
        ip.run_cell_magic("bloombee", "generate", "\n  \n")
    with pytest.raises(UsageError, match="go with --speculative"):
        ip.run_cell_magic("bloombee", "generate --tree 2,2", "hi")
    with pytest.raises(UsageError, match="cannot load the draft model"):
        ip.run_cell_magic("bloombee", "generate --speculative --draft /nonexistent/draft", "hi")
    with pytest.raises(UsageError, match="only `%%bloombee generate` and `%%bloombee chat` take a cell body"):
        ip.run_cell_magic("bloombee", "status", "x")


def test_usage_error_shows_no_traceback(ip, capsys):
    ip.run_cell("%bloombee plan --batch zero")
    err = capsys.readouterr().err
    assert "UsageError" in err and "Traceback" not in err


def test_help_lists_every_subcommand(ip, capsys):
    ip.run_line_magic("bloombee", "help")
    text = capsys.readouterr().out
    subs = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices).choices
    for name in subs:
        assert f"\n{name}: " in "\n" + text
    assert "--max-new-tokens" in text and "--objective" in text and "%config BloombeeMagics" in text
    ip.run_cell("%bloombee?")
    doc = ip.find_line_magic("bloombee").__doc__
    assert all(f"{name}: " in doc for name in subs)
    ip.run_line_magic("bloombee", "plan -h")      # argparse's own help: printed, nothing runs
    assert "--planner" in capsys.readouterr().out


def test_config_traits(ip, capsys):
    ip.run_line_magic("config", "BloombeeMagics.max_new_tokens = 3")
    try:
        ip.run_cell_magic("bloombee", "generate --out short", "x = 1")
        assert ip.user_ns["short"].new_tokens == 3
    finally:
        ip.run_line_magic("config", "BloombeeMagics.max_new_tokens = 64")
    magics = next(c for c in ip.configurables if type(c).__name__ == "BloombeeMagics")
    ip.run_line_magic("config", "BloombeeMagics.display = 'hologram'")   # IPython logs the error …
    assert magics.display == "static"                                    # … and keeps the valid value
    ip.run_line_magic("config", "BloombeeMagics.display = 'static'")
    ip.run_line_magic("config", "BloombeeMagics")
    assert "BloombeeMagics.workers" in capsys.readouterr().out


def test_reload_extension_keeps_one_set_of_magics(ip, capsys):
    ip.run_line_magic("reload_ext", "bloombee_nb")
    assert sum(type(c).__name__ == "BloombeeMagics" for c in ip.configurables) == 1
    ip.run_line_magic("bloombee", "status")
    assert "2 workers" in capsys.readouterr().out          # the session survives a reload


def status_rows(text: str) -> list[list[str]]:
    """The per-stage table of ``%bloombee status``'s text, as cells (columns are 2+ spaces apart)."""
    lines = text[text.index("stages now:"):].splitlines()[1:]
    return [re.split(r"\s{2,}", line.strip()) for line in lines if line.strip() and not line.startswith("  !")]


def test_status_shows_each_stage_memory_per_tier_and_sessions(ip, capsys):
    import bloombee_nb as bb
    from bloombee_nb.plan._format import fmt_bytes

    s = session()
    placed = s.model
    offloaded = bb.DistributedModelForCausalLM.from_pretrained(default_model_path(), cluster=s.cluster,
                                                               weight_offload=0.5)
    s.model = offloaded                                 # the status panel reads the session's model
    try:
        ids = s.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        with offloaded.inference_session(max_length=32) as open_session:
            offloaded.generate(ids, session=open_session, max_new_tokens=2, do_sample=False,
                               pad_token_id=s.tokenizer.pad_token_id)
            ip.run_line_magic("bloombee", "status")
            out = capsys.readouterr().out
            html = s._repr_html_()
            infos = offloaded.chain.info()
        header, *rows = status_rows(out)
        assert header[:6] == ["stage", "worker", "layers", "sessions", "queued", "micro-batch"]
        assert len(rows) == len(offloaded.placement.stages) == len(infos)
        for row, st, info in zip(rows, offloaded.placement.stages, infos):
            cells = dict(zip(header, row))
            assert cells["layers"] == f"{st.start}–{st.end - 1}" and cells["sessions"] == "1"
            assert info["offloaded_weight_bytes"] > 0
            assert cells["offloaded weights (RAM/disk)"] == f"{fmt_bytes(info['offloaded_weight_bytes'])} (50%)"
            resident = info.get("resident_weight_bytes", info["weight_bytes"] - info["offloaded_weight_bytes"])
            assert cells["resident weights"] == fmt_bytes(resident) and info["reserved_kv_bytes"] > 0
            assert cells["reserved KV"] == fmt_bytes(info["reserved_kv_bytes"]) and cells["fast tier"].startswith("RAM ")
            assert cells["cold KV (disk)"] == "0 B (0%)"
        assert "<th colspan=4>fast tier</th>" in html and "(50%)</td>" in html and "<td>1</td>" in html
    finally:
        s.model = placed
        offloaded.close()
    s.model = offloaded                                 # its chain is released: the panel says so, not raises
    try:
        ip.run_line_magic("bloombee", "status")
        out = capsys.readouterr().out
        assert all(row[3] == "unreachable" for row in status_rows(out)[1:]) and "! unreachable:" in out
        assert "<i>unreachable</i>" in s._repr_html_()
    finally:
        s.model = placed


def test_disconnect_then_commands_say_what_to_do(ip, capsys):
    ip.run_line_magic("bloombee", "disconnect")
    try:
        assert session().cluster is None and "disconnected" in capsys.readouterr().out
        with pytest.raises(UsageError, match="not connected: run `%bloombee connect local`"):
            ip.run_line_magic("bloombee", "plan")
        with pytest.raises(UsageError, match="not connected"):
            ip.run_cell_magic("bloombee", "generate", "hi")
        ip.run_line_magic("bloombee", "status")
        assert "not connected" in capsys.readouterr().out
    finally:  # the tests after this one use the module's connection (each test stands alone)
        ip.run_line_magic("bloombee", "connect local --workers 2")


@pytest.mark.slow  # profiles, plans and generates a batch (9 s)
def test_connect_for_throughput_sets_micro_batch_and_groups_and_stays_exact(ip, capsys):
    ip.run_line_magic("bloombee", "connect local --workers 2 --throughput --micro-batch 2")
    try:
        model = session().model
        assert model.micro_batch == 2 and model.chain.group
        ip.run_line_magic("bloombee", "status")
        out = capsys.readouterr().out
        assert "micro-batch" in out and "whole batch" not in out  # each stage shows its 2 rows
        ip.run_cell_magic("bloombee", "generate --max-new-tokens 6 --out r", PROMPT + "\n")
        tok = AutoTokenizer.from_pretrained(default_model_path())
        ref = AutoModelForCausalLM.from_pretrained(default_model_path()).eval()
        ids = tok(PROMPT, return_tensors="pt")
        with torch.no_grad():
            want = ref.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert ip.user_ns["r"].text == tok.decode(want[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        ip.run_line_magic("bloombee", "connect local --workers 2")


def test_host_lends_the_workers_to_the_swarm_and_swarm_shows_it(ip, checkpoints):
    path = checkpoints["llama"]
    ip.run_line_magic("bloombee", f"host {path} --layers 3")
    try:
        ip.run_line_magic("bloombee", "swarm --out view")
        view = ip.user_ns["view"]
        assert view.replicas(path) == [1, 1, 1, 1, 1]
        assert sorted(s.span for s in view.spans) == [(0, 3), (3, 5)]
        with pytest.raises(UsageError, match="no worker named nope"):
            ip.run_line_magic("bloombee", f"host {path} --workers nope")
    finally:
        ip.run_line_magic("bloombee", f"host {path} --stop")
    ip.run_line_magic("bloombee", "swarm --out after")
    assert ip.user_ns["after"].spans == ()


def test_chat_cells_continue_one_conversation_on_the_stages(ip, capsys):
    from bloombee_nb.generate.chat import Chat

    s = session()
    with pytest.raises(UsageError, match="chat template"):
        ip.run_cell_magic("bloombee", "chat", "hello")
    s.tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    try:
        ip.run_cell_magic("bloombee", "chat --max-new-tokens 5", "def add(a, b):\n")
        chat = s.chat
        assert isinstance(chat, Chat) and len(chat.messages) == 2
        held = chat.tokens.shape[1]
        ip.run_cell_magic("bloombee", "chat --max-new-tokens 5", "and subtract?\n")
        assert s.chat is chat and len(chat.messages) == 4 and chat.resent == 0   # same session, KV kept
        assert chat.tokens.shape[1] > held and chat.session.length >= held
        assert chat.messages[1]["content"] in capsys.readouterr().out           # the reply streamed
    finally:
        s.tokenizer.chat_template = None
        if s.chat is not None:
            s.chat.close()
            s.chat = None
