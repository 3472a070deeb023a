"""Train the tiny shipped model pair (target + draft) on the CPython stdlib.

Everything is offline and deterministic: the corpus is the standard library's
own *.py sources, the tokenizer is a byte-level BPE trained on it, and both
models are small Llamas trained from fixed seeds on the CPU in fp32.

    python -m bloombee_nb.shipped.train_tiny            # writes next to this file
    python bloombee_nb/shipped/train_tiny.py --out DIR --target-steps 10 --draft-steps 10

Outputs (under --out): tiny-llama/ (target), tiny-llama-draft/ (draft),
training_results.json (measured numbers).
"""

import argparse
import json
import math
import os
import random
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS = "<s>", "</s>"  # real special tokens; pad reuses eos
VOCAB_SIZE = 4096
CONTEXT = 256
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

# Architectures: sized so both fp32 checkpoints together stay under ~20 MB.
TARGET_ARCH = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                   num_attention_heads=8, num_key_value_heads=2)  # GQA 8q/2kv, head_dim 32
DRAFT_ARCH = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


def seed_all(seed):
    random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- corpus
def stdlib_files():
    """Sorted stdlib *.py files (relative path, absolute path), minus test suites / site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIP_DIRS.isdisjoint(rel.parts[:-1]):
            files.append((rel.as_posix(), path))
    files.sort()
    # pydoc_data/topics.py (prose docs of the language) is part of the corpus by design.
    assert any(rel == "pydoc_data/topics.py" for rel, _ in files), "pydoc_data/topics.py missing"
    return files


def build_corpus():
    """Return (train_texts, val_texts); ~2% of files held out by a stable hash of their path."""
    train, val = [], []
    for rel, path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        held_out = zlib.crc32(rel.encode()) % 50 == 0 and rel != "pydoc_data/topics.py"
        (val if held_out else train).append(text)
    return train, val


# ---------------------------------------------------------------- tokenizer
def train_tokenizer(texts):
    """Byte-level BPE (GPT-2 style), deterministic for a fixed input order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    # Prepend <s> to every encoded text, as each training document starts with it.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=EOS, model_max_length=CONTEXT * 2)


def encode_stream(tokenizer, texts):
    """Concatenate <s> doc </s> for every document into one flat token stream."""
    ids = []
    # The raw `tokenizers` backend: fast, batched, and no max-length warnings for long files.
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=True):
        ids.extend(enc.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------- models
def make_model(arch, tokenizer, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=CONTEXT * 2,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype="float32", **arch)
    model = LlamaForCausalLM(config).float()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64)
    return model


def train(model, stream, steps, batch_size, lr, seed, label):
    """AdamW, linear warmup then cosine decay to 10% of lr, on random CONTEXT-long windows."""
    gen = torch.Generator().manual_seed(seed)
    # Weight decay on matrices (incl. the tied embedding) only, not on norm gains.
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    cosine = lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, cosine(s)))
    model.train()
    start = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - CONTEXT - 1, (batch_size,), generator=gen)
        batch = torch.stack([stream[s:s + CONTEXT] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"[{label}] step {step:5d}/{steps} loss {loss.item():.3f} "
                  f"lr {sched.get_last_lr()[0]:.2e} {time.time() - start:6.0f}s", flush=True)
    model.eval()
    return time.time() - start


@torch.no_grad()
def evaluate(target, draft, stream, max_blocks):
    """Held-out mean token loss of both models and the draft's greedy agreement with the target."""
    n = min(max_blocks, len(stream) // CONTEXT)
    blocks = stream[: n * CONTEXT].view(n, CONTEXT)
    tot = {"target": 0.0, "draft": 0.0}
    agree = count = 0
    for chunk in blocks.split(16):
        t_logits = target(input_ids=chunk).logits[:, :-1]
        d_logits = draft(input_ids=chunk).logits[:, :-1]
        labels = chunk[:, 1:]
        tot["target"] += F.cross_entropy(t_logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
        tot["draft"] += F.cross_entropy(d_logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
        agree += (t_logits.argmax(-1) == d_logits.argmax(-1)).sum().item()
        count += labels.numel()
    loss = {k: v / count for k, v in tot.items()}
    return loss, agree / count, count


def dir_size_mb(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def main():
    # Long: the training recipe read top to bottom (corpus, tokenizer, both models, evaluation, the
    # results record); the record is built from nearly every local, so a helper would take them all.
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--target-steps", type=int, default=1000)
    ap.add_argument("--draft-steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-blocks", type=int, default=256, help="held-out blocks of CONTEXT tokens")
    # One thread: on the 2-vCPU machine a second thread gave no speed-up (and hurts under contention).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    t0 = time.time()
    out = Path(args.out)

    train_texts, val_texts = build_corpus()
    tokenizer = train_tokenizer(train_texts)
    train_ids, val_ids = encode_stream(tokenizer, train_texts), encode_stream(tokenizer, val_texts)
    print(f"corpus: {len(train_texts)} train / {len(val_texts)} held-out files, "
          f"{len(train_ids)} / {len(val_ids)} tokens ({time.time() - t0:.0f}s)", flush=True)

    target = make_model(TARGET_ARCH, tokenizer, args.seed)
    target_time = train(target, train_ids, args.target_steps, args.batch_size, 2e-3, args.seed + 1, "target")
    draft = make_model(DRAFT_ARCH, tokenizer, args.seed + 2)
    draft_time = train(draft, train_ids, args.draft_steps, args.batch_size, 5e-3, args.seed + 3, "draft")

    loss, agreement, n_eval = evaluate(target, draft, val_ids, args.eval_blocks)
    for name, model in [("tiny-llama", target), ("tiny-llama-draft", draft)]:
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)

    prompt = "def fibonacci(n):"
    enc = tokenizer(prompt, return_tensors="pt")
    sample = tokenizer.decode(target.generate(**enc, max_new_tokens=40, do_sample=False)[0],
                              skip_special_tokens=True)
    results = {
        "machine": f"{os.cpu_count()}-core CPU, torch {torch.__version__}, {args.threads} threads, fp32",
        "corpus": {"train_files": len(train_texts), "heldout_files": len(val_texts),
                   "train_tokens": len(train_ids), "heldout_tokens": len(val_ids),
                   "eval_tokens": n_eval},
        "vocab_size": len(tokenizer), "context": CONTEXT, "batch_size": args.batch_size,
        "seed": args.seed,
        "target": {"params": target.num_parameters(), "steps": args.target_steps,
                   "train_seconds": round(target_time, 1), "heldout_loss": round(loss["target"], 4),
                   "heldout_ppl": round(math.exp(loss["target"]), 2),
                   "size_mb": round(dir_size_mb(out / "tiny-llama"), 2), **TARGET_ARCH},
        "draft": {"params": draft.num_parameters(), "steps": args.draft_steps,
                  "train_seconds": round(draft_time, 1), "heldout_loss": round(loss["draft"], 4),
                  "heldout_ppl": round(math.exp(loss["draft"]), 2),
                  "size_mb": round(dir_size_mb(out / "tiny-llama-draft"), 2), **DRAFT_ARCH},
        "draft_greedy_agreement": round(agreement, 4),
        "total_wall_seconds": round(time.time() - t0, 1),
        "sample": {"prompt": prompt, "max_new_tokens": 40, "greedy_output": sample},
    }
    (out / "training_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
