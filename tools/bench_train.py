"""Training throughput of latent against PyTorch eager (transformers' DeepseekV2ForCausalLM) on the
same model config, batch, sequence length, data and thread count, measured in one run with the
two engines interleaved. Prints the median tokens/s of each and the ratio.

    python tools/bench_train.py [--preset v2-lite-6m] [--steps 12] [--rounds 2] [--threads 2]

Both sides: fp32, AdamW (beta 0.9/0.95, weight decay 0.1), gradient clipping at 1.0, the KJV
token stream (tools/kjv.sh and `latent tokenizer train` run first if data/kjv is missing).
latent's balance losses are turned off so that both compute the same loss.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib

import torch
from tokenizers import Tokenizer
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LATENT = os.path.join(ROOT, "target", "release", "latent")
DATA = os.path.join(ROOT, "data", "kjv")


def ensure_data():
    if not os.path.exists(os.path.join(DATA, "train.txt")):
        subprocess.run([os.path.join(ROOT, "tools", "kjv.sh"), DATA], check=True)
    if not os.path.exists(os.path.join(DATA, "tokenizer", "tokenizer.json")):
        subprocess.run([LATENT, "tokenizer", "train", os.path.join(DATA, "train.txt"), "--vocab-size", "4096",
                        "--out", os.path.join(DATA, "tokenizer")], check=True)


def latent_run(preset, steps, threads):
    out = tempfile.mkdtemp(prefix="bench-train-")
    args = [LATENT, "--threads", str(threads), "train", f"preset:{preset}",
            "--set", f'data.train=["{DATA}/train.txt"]', "--set", f'data.valid=["{DATA}/valid.txt"]',
            "--set", f'data.tokenizer="{DATA}/tokenizer"', "--set", f"schedule.steps={steps}",
            "--set", "run.eval_every=0", "--set", "run.eval_batches=1", "--set", "run.save_every=0",
            "--set", "balance.alpha1=0.0", "--set", "balance.alpha2=0.0", "--set", "balance.alpha3=0.0",
            "--set", "balance.seq_alpha=0.0", "--out", out]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "train_log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    return [e["tokens_per_s"] for e in log[2:]]  # the first steps warm up allocators and caches


def torch_run(run, steps, threads, tokens):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = dict(run["model"])
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    v3 = cfg.get("model_type") == "deepseek_v3"
    config = (DeepseekV3Config if v3 else DeepseekV2Config)(**cfg)
    model = (DeepseekV3ForCausalLM if v3 else DeepseekV2ForCausalLM)(config).float().train()
    o = run.get("optim", {})
    opt = torch.optim.AdamW(model.parameters(), lr=o.get("lr", 4.2e-4), betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    d = run.get("data", {})
    b, t = d.get("batch_size", 8), d.get("seq_len", 256)
    rates = []
    for step in range(steps):
        start = (step * b * t) % (len(tokens) - b * t - 1)
        batch = torch.tensor(tokens[start : start + b * t]).reshape(b, t)
        began = time.perf_counter()
        loss = model(batch, labels=batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        rates.append(b * t / (time.perf_counter() - began))
    return rates[2:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="v2-lite-6m")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not os.path.exists(LATENT):
        sys.exit("build latent first: cargo build --release")
    ensure_data()
    with open(os.path.join(ROOT, "presets", f"{args.preset}.toml"), "rb") as f:
        run = tomllib.load(f)
    tok = Tokenizer.from_file(os.path.join(DATA, "tokenizer", "tokenizer.json"))
    with open(os.path.join(DATA, "train.txt")) as f:
        tokens = tok.encode(f.read()).ids
    n_params = None
    lat, tch = [], []
    for r in range(args.rounds):
        lat += latent_run(args.preset, args.steps, args.threads)
        tch += torch_run(run, args.steps, args.threads, tokens)
        print(f"round {r + 1}: latent {statistics.median(lat):.0f} tok/s, PyTorch {statistics.median(tch):.0f} tok/s",
              file=sys.stderr)
    m = run["model"]
    d = run.get("data", {})
    print(f"training throughput, preset {args.preset} (hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
          f"{m.get('n_routed_experts', 0)} routed experts top-{m.get('num_experts_per_tok', 0)}), "
          f"batch {d.get('batch_size', 8)} x {d.get('seq_len', 256)}, fp32, AdamW, {args.threads} threads")
    print(f"  latent            {statistics.median(lat):8.0f} tok/s (median of {len(lat)} steps)")
    print(f"  PyTorch {torch.__version__:<10}{statistics.median(tch):8.0f} tok/s (median of {len(tch)} steps)")
    print(f"  latent / PyTorch  {statistics.median(lat) / statistics.median(tch):8.2f}x")


if __name__ == "__main__":
    main()
