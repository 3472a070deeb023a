"""Where a decode step of a span goes on a GPU: our SpanRunner against transformers' own model.

    python benchmarks/gpu_profile.py      # on a machine with a CUDA GPU (~1 min)

Builds a random-init Llama (hidden 2048, 8 layers, bf16), then times one decode step after a
128-token prompt (a) through ``SpanRunner(device="cuda")`` (inputs and output on the CPU, as a
stage gets them) and (b) through ``LlamaForCausalLM`` itself on the GPU with a DynamicCache, and
prints torch.profiler's top operators for (a). Writes $OUT/gpu_profile.json when OUT is set.
"""

import json
import os
import tempfile
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from bloombee_nb.model.span import SpanRunner

P, STEPS, WARM = 128, 20, 5


def timed(fn, n):
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return sorted(out)[len(out) // 2] * 1e3


def main():
    cfg = LlamaConfig(vocab_size=8192, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    d = tempfile.mkdtemp()
    model.save_pretrained(d)
    res = {}
    r = SpanRunner(d, 0, 8, dtype=torch.bfloat16, device="cuda")
    D = cfg.hidden_size
    with torch.inference_mode():
        r.open("s", 1, P + 200)
        r.forward("s", torch.randn(1, P, D).to(torch.bfloat16), torch.arange(P)[None], torch.ones(1, P, dtype=torch.long))
        pos = [P]

        def span_step():
            r.forward("s", torch.randn(1, 1, D).to(torch.bfloat16), torch.tensor([[pos[0]]]),
                      torch.ones(1, 1, dtype=torch.long))
            pos[0] += 1

        timed(span_step, WARM)
        res["span_decode_ms"] = timed(span_step, STEPS)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                span_step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        print(table)
        res["profile_top"] = table

        hf = model.to("cuda")
        ids = torch.randint(0, 8192, (1, P), device="cuda")
        cache = DynamicCache(config=cfg)
        hf(ids, past_key_values=cache, use_cache=True)
        nxt = ids[:, -1:]

        def hf_step():
            hf(nxt, past_key_values=cache, use_cache=True)

        timed(hf_step, WARM)
        res["transformers_decode_ms"] = timed(hf_step, STEPS)
    print(json.dumps({k: v for k, v in res.items() if k != "profile_top"}))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_profile.json"), "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
