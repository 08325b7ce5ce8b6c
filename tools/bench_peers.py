#!/usr/bin/env python3
"""latent against llama.cpp (and transformers) on the same weights, interleaved, same thread count.

    python tools/bench_peers.py --model DIR --llama-cpp LLAMA_DIR [--work DIR] [--threads 2]
        [--formats bf16,q8_0,q4_k_m] [--depths 0,4096,16384] [--prompt 512] [--gen 32]
        [--rounds 1] [--repeats 3] [--transformers] [--kv-cache int8] [--json OUT.json]

1. Converts the safetensors checkpoint in DIR to GGUF with llama.cpp's own converter
   (tools/convert_gguf.py) in bf16, then llama-quantize makes Q8_0 and Q4_K_M from it. The files
   are kept in --work and reused.
2. Each round runs, for every format, llama-bench and `latent bench` on the same GGUF file (the
   order of the two alternates between rounds), and with --transformers, torch bf16 on the
   safetensors once per round. Within a round each engine repeats prefill and decode at depth 0
   --repeats times (llama-bench: the mean, latent: the median); llama-bench's deep decode runs once,
   as it fills the cache with a real prefill. Peak RSS of each process is taken by /usr/bin/time.
3. Prints a table of medians over rounds: prefill tokens/s (prompt of --prompt), decode tokens/s
   at each depth, peak RSS, and latent's ratio to llama.cpp (prefill: to the faster of llama.cpp
   and transformers).

With --kv-cache int8 both engines cache in 8 bits: latent with `--kv-cache int8` (codes and a scale
per 128 latents), llama.cpp with `-ctk q8_0 -ctv q8_0 -fa 1` (its quantized cache needs flash
attention).

llama-bench fills the cache at depth d with a real prefill of d tokens; latent bench fills it with
random latents (the attention cost does not depend on the values). The decode figures time the
same thing: --gen tokens generated after the cache holds d tokens.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def timed(cmd, env=None):
    """Runs cmd under /usr/bin/time; returns (stdout, peak RSS bytes)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        full = ["/usr/bin/time", "-f", "%M", "-o", t.name] + cmd
        log("+", " ".join(cmd))
        out = subprocess.run(full, check=True, capture_output=True, text=True, env=env)
        rss_kb = int(open(t.name).read().strip().splitlines()[-1])
    return out.stdout, rss_kb * 1024


def ensure_gguf(args, fmt):
    path = os.path.join(args.work, f"model-{fmt}.gguf")
    if os.path.exists(path):
        return path
    bf16 = os.path.join(args.work, "model-bf16.gguf")
    if not os.path.exists(bf16):
        subprocess.run([sys.executable, os.path.join(HERE, "convert_gguf.py"), args.llama_cpp, args.model,
                        "--outtype", "bf16", "--outfile", bf16], check=True)
    if fmt != "bf16":
        quantize = os.path.join(args.llama_cpp, "build", "bin", "llama-quantize")
        subprocess.run([quantize, bf16, path, fmt.upper()], check=True, capture_output=True)
    return path


def llama_bench(args, path):
    exe = os.path.join(args.llama_cpp, "build", "bin", "llama-bench")
    common = [exe, "-m", path, "-t", str(args.threads), "-o", "json"]
    if args.kv_cache == "int8":
        common += ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "1"]
    # Prefill and decode at depth 0: cheap, so --repeats repetitions (llama-bench reports their mean).
    out, rss1 = timed(common + ["-r", str(args.repeats), "-p", str(args.prompt), "-n", str(args.gen)])
    rows = json.loads(out)
    prefill = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
    decode = {"0": next(r["avg_ts"] for r in rows if r["n_gen"] > 0)}
    deep = [d for d in args.depths if d > 0]
    rss2 = 0
    if deep:
        # llama-bench fills the cache with a real prefill of each depth (minutes at 16K on 2 cores):
        # one repetition, no warm-up run.
        depths = ",".join(str(d) for d in deep)
        out, rss2 = timed(common + ["-r", "1", "--no-warmup", "-p", "0", "-n", str(args.gen), "-d", depths])
        decode.update({str(r["n_depth"]): r["avg_ts"] for r in json.loads(out)})
    return {"prefill_tok_s": prefill, "decode_tok_s": decode, "peak_rss_bytes": max(rss1, rss2)}


def latent_bench(args, path):
    cmd = [args.latent, "--threads", str(args.threads), "bench", "--model", path, "--prompt-len", str(args.prompt),
           "--depths", ",".join(str(d) for d in args.depths), "--decode-tokens", str(args.gen), "--repeats", str(args.repeats),
           "--json"]
    if args.kv_cache == "int8":
        cmd += ["--kv-cache", "int8"]
    out, rss = timed(cmd)
    report = json.loads(out)
    report["peak_rss_bytes"] = rss
    return report


def transformers_bench(args):
    cmd = [sys.executable, __file__, "--transformers-worker", "--model", args.model, "--threads", str(args.threads),
           "--prompt", str(args.prompt), "--gen", str(args.gen)]
    out, rss = timed(cmd)
    report = json.loads(out)
    report["peak_rss_bytes"] = rss
    return report


def transformers_worker(args):
    """Prefill of --prompt random tokens, then --gen greedy steps with the cache, torch bf16."""
    import time

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    rng = random.Random(1)
    ids = torch.tensor([[rng.randrange(100, model.config.vocab_size) for _ in range(args.prompt)]])
    with torch.no_grad():
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = args.prompt / (time.perf_counter() - start)
        cache = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        small = model(ids[:, :1], use_cache=True)  # decode at depth ~0: a one-token cache
        cache, tok = small.past_key_values, small.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(args.gen):
            out = model(tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = args.gen / (time.perf_counter() - start)
    print(json.dumps({"prefill_tok_s": prefill, "decode_tok_s": {"0": decode}}))


def median_of(runs, key, depth=None):
    vals = [r[key][depth] if depth is not None else r[key] for r in runs if r is not None]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--llama-cpp")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "latent-peers"))
    ap.add_argument("--latent", default=os.path.join(REPO, "target", "release", "latent"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="bf16,q8_0,q4_k_m")
    ap.add_argument("--depths", default="0,4096,16384")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="repetitions inside each engine's own bench")
    ap.add_argument("--transformers", action="store_true")
    ap.add_argument("--kv-cache", choices=["auto", "int8"], default="auto",
                    help="int8: both engines cache in 8 bits (latent --kv-cache int8, llama.cpp -ctk/-ctv q8_0 -fa 1)")
    ap.add_argument("--json")
    ap.add_argument("--transformers-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.transformers_worker:
        return transformers_worker(args)
    if not args.llama_cpp:
        sys.exit("--llama-cpp is required (tools/llama_cpp.sh prints the folder)")
    args.depths = [int(d) for d in args.depths.split(",")]
    args.model, args.llama_cpp = os.path.abspath(args.model), os.path.abspath(args.llama_cpp)
    os.makedirs(args.work, exist_ok=True)
    formats = args.formats.split(",")
    files = {f: ensure_gguf(args, f) for f in formats}
    results = {f: {"latent": [], "llama.cpp": []} for f in formats}
    hf_runs = []
    for round_ in range(args.rounds):
        for f in formats:
            engines = [("latent", latent_bench), ("llama.cpp", llama_bench)]
            if round_ % 2:
                engines.reverse()
            for name, run in engines:
                results[f][name].append(run(args, files[f]))
                log(f"round {round_ + 1} {f} {name}: {json.dumps(results[f][name][-1], default=str)[:300]}")
        if args.transformers:
            hf_runs.append(transformers_bench(args))
            log(f"round {round_ + 1} transformers: {hf_runs[-1]}")

    summary = {"threads": args.threads, "rounds": args.rounds, "prompt": args.prompt, "gen": args.gen,
               "kv_cache": args.kv_cache, "formats": {}}
    hf_prefill = median_of(hf_runs, "prefill_tok_s") if hf_runs else None
    if hf_runs:
        summary["transformers"] = {"prefill_tok_s": hf_prefill, "decode_tok_s": {"0": median_of(hf_runs, "decode_tok_s", "0")},
                                   "peak_rss_bytes": median_of(hf_runs, "peak_rss_bytes")}
    lines = ["| format | engine | prefill tok/s | " + " | ".join(f"decode@{d} tok/s" for d in args.depths) + " | peak RSS GiB |",
             "|---|---|---:|" + "---:|" * len(args.depths) + "---:|"]
    for f in formats:
        row = {}
        for engine in ("latent", "llama.cpp"):
            runs = results[f][engine]
            row[engine] = {
                "prefill_tok_s": median_of(runs, "prefill_tok_s"),
                "decode_tok_s": {str(d): median_of(runs, "decode_tok_s", str(d)) for d in args.depths},
                "peak_rss_bytes": median_of(runs, "peak_rss_bytes"),
            }
        lat, ref = row["latent"], row["llama.cpp"]
        best_prefill = max(ref["prefill_tok_s"], hf_prefill or 0)
        row["ratio"] = {
            "prefill_vs_best_peer": lat["prefill_tok_s"] / best_prefill,
            "decode": {str(d): lat["decode_tok_s"][str(d)] / ref["decode_tok_s"][str(d)] for d in args.depths},
            "peak_rss": lat["peak_rss_bytes"] / ref["peak_rss_bytes"],
        }
        roofline = [r.get("roofline_share", {}).get("0") for r in results[f]["latent"]]
        row["latent_roofline_share_at_0"] = statistics.median([x for x in roofline if x is not None]) if any(roofline) else None
        summary["formats"][f] = row
        for engine in ("latent", "llama.cpp"):
            e = row[engine]
            dec = " | ".join(f"{e['decode_tok_s'][str(d)]:.1f}" for d in args.depths)
            lines.append(f"| {f} | {engine} | {e['prefill_tok_s']:.1f} | {dec} | {e['peak_rss_bytes'] / 2**30:.2f} |")
        r = row["ratio"]
        dec = " | ".join(f"{r['decode'][str(d)]:.2f}x" for d in args.depths)
        lines.append(f"| {f} | **latent / llama.cpp** | {lat['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x | {dec} | {r['peak_rss']:.2f}x |")
    if hf_runs:
        t = summary["transformers"]
        lines.append(f"| bf16 (safetensors) | transformers | {t['prefill_tok_s']:.1f} | {t['decode_tok_s']['0']:.1f} |"
                     + " – |" * (len(args.depths) - 1) + f" {t['peak_rss_bytes'] / 2**30:.2f} |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"summary": summary, "runs": results, "transformers_runs": hf_runs}, fh, indent=2)


if __name__ == "__main__":
    main()
