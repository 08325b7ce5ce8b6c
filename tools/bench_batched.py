#!/usr/bin/env python3
"""Batched decode against llama.cpp's llama-batched-bench, on the same GGUF files, same threads.

    python tools/bench_batched.py --llama-cpp LLAMA_DIR GGUF [GGUF ...] [--batch 1,2,4,8,16,32]
        [--prompt 128] [--gen 32] [--threads 2] [--rounds 2] [--shared-prompt] [--kv-cache int8]
        [--json OUT.json]

For each file and round (the order of the two engines alternating between rounds):
- llama-batched-bench -npp PROMPT -ntg GEN -npl B...: B sequences, each prefilled with PROMPT
  tokens, then GEN tokens decoded for all of them together; its S_TG (decode tokens/s, all
  sequences) is the figure. With --shared-prompt it prefills one prompt and copies its cache to
  the other sequences (-pps): its caches are one per sequence (llama.cpp's default, not unified),
  so each sequence still decodes over its own PROMPT rows, and a 4096-token depth at B = 16 costs
  one prefill of 4096 tokens instead of 65,536 (the same S_TG within noise, measured at 1024 x 8);
- `latent bench --batch B... --batch-depth PROMPT --decode-tokens GEN`: B sequences PROMPT deep
  (latent fills the caches with random rows; the attention does not depend on their values),
  GEN steps of B tokens; tokens/s of all sequences.

With --kv-cache int8 both engines keep an 8-bit cache: latent its int8 rows, llama.cpp q8_0 for K
and V with flash attention (-ctk q8_0 -ctv q8_0 -fa on).

Prints, per file and B, the median over rounds of each engine and latent's ratio; --json keeps
every figure. llama.cpp runs with its defaults otherwise (weight repacking on, or off where it
aborts: the log says so).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def llama(bin_dir, gguf, batch, prompt, gen, threads, shared=False, int8=False, repack=True):
    cmd = [os.path.join(bin_dir, "llama-batched-bench"), "-m", gguf, "-c", str(max(batch) * (prompt + gen) + 64),
           "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(gen), "-npl", ",".join(map(str, batch)),
           "-t", str(threads), "--output-format", "jsonl"] + ([] if repack else ["--no-repack"])
    cmd += ["-pps"] if shared else []
    cmd += ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"] if int8 else []
    log("+", " ".join(cmd))
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0 and repack:
        # Its weight repacking aborts on some CPUs (GGML_ASSERT in the scheduler): without it.
        log(f"llama-batched-bench failed ({run.returncode}); again with --no-repack")
        return llama(bin_dir, gguf, batch, prompt, gen, threads, shared, int8, repack=False)
    run.check_returncode()
    out = run.stdout
    figures = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            row = json.loads(line)
            figures[int(row["pl"])] = float(row["speed_tg"])
    return figures


def latent(binary, gguf, batch, prompt, gen, threads, int8=False):
    cmd = [binary, "bench", "--model", gguf, "--threads", str(threads), "--prompt-len", "16", "--depths", "0",
           "--decode-tokens", str(gen), "--repeats", "1", "--batch", ",".join(map(str, batch)),
           "--batch-depth", str(prompt), "--json"] + (["--kv-cache", "int8"] if int8 else [])
    log("+", " ".join(cmd))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    return {int(b): float(t) for b, t in report["batch_decode_tok_s"].items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", nargs="+")
    p.add_argument("--llama-cpp", required=True, help="llama.cpp folder (tools/llama_cpp.sh prints it)")
    p.add_argument("--latent", default=os.path.join(REPO, "target", "release", "latent"))
    p.add_argument("--batch", default="1,2,4,8,16,32")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--shared-prompt", action="store_true",
                   help="llama.cpp prefills one prompt and copies its cache to every sequence (-pps)")
    p.add_argument("--kv-cache", choices=["bf16", "int8"], default="bf16",
                   help="int8: an 8-bit cache in both engines (latent's int8 rows, llama.cpp's q8_0 with -fa)")
    p.add_argument("--json")
    a = p.parse_args()
    int8 = a.kv_cache == "int8"
    batch = [int(b) for b in a.batch.split(",")]
    bin_dir = os.path.join(a.llama_cpp, "build", "bin")
    results = {}
    for gguf in a.gguf:
        runs = {"llama.cpp": [], "latent": []}
        for r in range(a.rounds):
            order = ["llama.cpp", "latent"] if r % 2 == 0 else ["latent", "llama.cpp"]
            for engine in order:
                if engine == "llama.cpp":
                    runs[engine].append(llama(bin_dir, gguf, batch, a.prompt, a.gen, a.threads, a.shared_prompt, int8))
                else:
                    runs[engine].append(latent(a.latent, gguf, batch, a.prompt, a.gen, a.threads, int8))
        results[os.path.basename(gguf)] = runs
    print(f"decode tokens/s of B sequences together, {a.prompt} tokens deep, {a.threads} threads, "
          f"{a.kv_cache} cache, median of {a.rounds} rounds")
    print(f"{'file':<28} {'B':>4} {'llama.cpp':>10} {'latent':>9} {'ratio':>7}")
    table = {}
    for name, runs in results.items():
        table[name] = {}
        for b in batch:
            l = statistics.median(run[b] for run in runs["llama.cpp"])
            t = statistics.median(run[b] for run in runs["latent"])
            table[name][b] = {"llama.cpp": l, "latent": t, "ratio": t / l}
            print(f"{name:<28} {b:>4} {l:>10.1f} {t:>9.1f} {t / l:>6.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"prompt": a.prompt, "gen": a.gen, "threads": a.threads, "rounds": a.rounds,
                       "shared_prompt": a.shared_prompt, "kv_cache": a.kv_cache,
                       "medians": table, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
