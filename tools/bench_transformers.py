#!/usr/bin/env python3
"""Runs the same generation as `latent generate --temperature 0` with Hugging Face transformers, for comparison.

Same checkpoint, same prompt tokens (BOS added as tokenizer_config.json says), greedy decoding with the KV cache,
torch on the CPU in the checkpoint's dtype. Prints load time, prompt and decode tokens/s, and peak RSS.

  python3 tools/bench_transformers.py --model DIR --prompt-file FILE [--max-tokens 64] [--threads 2]
"""

import argparse
import json
import os
import resource
import time

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-file", required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    with open(os.path.join(args.model, "tokenizer_config.json")) as f:
        tcfg = json.load(f)
    with open(args.prompt_file) as f:
        ids = tok.encode(f.read(), add_special_tokens=False).ids
    if tcfg.get("add_bos_token"):
        bos = tcfg["bos_token"]
        ids = [tok.token_to_id(bos["content"] if isinstance(bos, dict) else bos)] + ids

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").eval()
    load = time.perf_counter() - start

    with torch.no_grad():
        start = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True)
        prefill = time.perf_counter() - start
        cache, next_id = out.past_key_values, int(out.logits[0, -1].argmax())
        start = time.perf_counter()
        for _ in range(args.max_tokens - 1):
            out = model(torch.tensor([[next_id]]), past_key_values=cache, use_cache=True)
            cache, next_id = out.past_key_values, int(out.logits[0, -1].argmax())
        decode = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"transformers {model.dtype}: loaded in {load:.2f} s; prompt {len(ids)} tokens in {prefill:.3f} s "
        f"({len(ids) / prefill:.1f} tokens/s); generated {args.max_tokens} tokens, decode "
        f"{(args.max_tokens - 1) / decode:.1f} tokens/s; peak RSS {rss / 2**30:.2f} GiB"
    )


if __name__ == "__main__":
    main()
