"""Checks that a checkpoint latent trained loads in Hugging Face transformers and computes what
latent computes: the perplexity of a text, with the same windows, from both engines.

    python tools/check_checkpoint.py CHECKPOINT_DIR TEXT_FILE [--context 256] [--latent target/release/latent]

Exits non-zero if transformers cannot load the checkpoint, expects a tensor it lacks, or the two
negative log-likelihoods differ by more than 1e-4 (relative).
"""

import argparse
import json
import math
import os
import subprocess
import sys

import torch
import transformers
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from make_fixtures import perplexity  # the windows `latent perplexity` uses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("text")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--latent", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "latent"))
    args = ap.parse_args()
    torch.set_num_threads(2)

    model, info = AutoModelForCausalLM.from_pretrained(
        args.checkpoint, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    model.eval()
    if info.get("missing_keys"):
        # transformers would run these with fresh random weights: the config means something else to it.
        sys.exit(f"transformers expected tensors the checkpoint lacks: {sorted(info['missing_keys'])[:8]}")
    tok = Tokenizer.from_file(os.path.join(args.checkpoint, "tokenizer.json"))
    with open(os.path.join(args.checkpoint, "tokenizer_config.json")) as f:
        tcfg = json.load(f)
    with open(args.text) as f:
        text = f.read()
    ids = tok.encode(text, add_special_tokens=False).ids
    if tcfg.get("add_bos_token"):
        ids = [tok.token_to_id(tcfg["bos_token"])] + ids
    count, nll = perplexity(model, ids, args.context)

    out = subprocess.run(
        [args.latent, "perplexity", "--model", args.checkpoint, "--file", args.text, "--context", str(args.context),
         "--dtype", "f32", "--json"],
        check=True, capture_output=True, text=True,
    )
    latent = json.loads(out.stdout)
    rel = abs(latent["nll"] - nll) / nll
    print(f"{type(model).__name__} (transformers {transformers.__version__}) loaded {args.checkpoint}")
    print(f"transformers: {count} tokens, nll {nll:.6f}, ppl {math.exp(nll):.4f}")
    print(f"latent:       {latent['tokens']} tokens, nll {latent['nll']:.6f}, ppl {latent['ppl']:.4f}")
    print(f"relative difference {rel:.2e}")
    if latent["tokens"] != count or rel > 1e-4:
        print("MISMATCH", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
