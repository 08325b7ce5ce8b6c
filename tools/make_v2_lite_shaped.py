#!/usr/bin/env python3
"""Writes a DeepSeek-V2-Lite-shaped checkpoint with random bf16 weights, for load and speed checks.

Exact V2-Lite dimensions (hidden 2048, 16 heads, kv_lora_rank 512, no q_lora, 64 routed experts top-6 +
2 shared, vocab 102400, YaRN to 163840 positions) with fewer layers so that it fits this machine.
Tensors use the published names and are written in ~2 GB shards with a model.safetensors.index.json.
The tokenizer is the small BPE of tests/fixtures/tokenizer (the real V2 tokenizer is not on PyPI):
its ids are a subset of the model's vocabulary.

With --v32, a DeepSeek-V3.2-shaped one instead, for the sparse-attention benchmark: V3.2's attention
exactly (hidden 7168, 128 heads, q_lora_rank 1536, kv_lora_rank 512, rope 64, nope 128, v 128, the
lightning indexer's 64 heads of 128 and index_topk 2048, YaRN to 163840 positions) and less of the
rest: 2 layers by default, the first with a dense MLP of 2048, the second MoE with 4 routed experts
of 512 (top 2) and 1 shared; vocabulary 4096.

With --mtp, one multi-token-prediction module after the last layer, as DeepSeek-V3 lays it out (for the
speculative-decoding measurements).

  python3 tools/make_v2_lite_shaped.py OUT_DIR [--layers 6] [--seed 0] [--v32] [--mtp]

Needs numpy only.
"""

import argparse
import json
import math
import os
import shutil
import struct

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")


def tensor_shapes(c):
    h = c["hidden_size"]
    yield "model.embed_tokens.weight", (c["vocab_size"], h)
    for i in range(c["num_hidden_layers"]):
        yield from layer_shapes(c, i)
    for k in range(c.get("num_nextn_predict_layers", 0)):
        # A multi-token-prediction module (DeepSeek-V3's layout): a decoder layer and its input
        # projections; it shares the embedding and the output head with the main model.
        i = c["num_hidden_layers"] + k
        p = f"model.layers.{i}"
        yield f"{p}.enorm.weight", (h,)
        yield f"{p}.hnorm.weight", (h,)
        yield f"{p}.eh_proj.weight", (h, 2 * h)
        yield f"{p}.shared_head.norm.weight", (h,)
        yield from layer_shapes(c, i)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (c["vocab_size"], h)


def layer_shapes(c, i):
    h, heads = c["hidden_size"], c["num_attention_heads"]
    dn, dr, dv, dc = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    p = f"model.layers.{i}"
    yield f"{p}.input_layernorm.weight", (h,)
    yield f"{p}.post_attention_layernorm.weight", (h,)
    if c.get("q_lora_rank"):
        r = c["q_lora_rank"]
        yield f"{p}.self_attn.q_a_proj.weight", (r, h)
        yield f"{p}.self_attn.q_a_layernorm.weight", (r,)
        yield f"{p}.self_attn.q_b_proj.weight", (heads * (dn + dr), r)
    else:
        yield f"{p}.self_attn.q_proj.weight", (heads * (dn + dr), h)
    if "index_topk" in c:
        hi, di = c["index_n_heads"], c["index_head_dim"]
        yield f"{p}.self_attn.indexer.wq_b.weight", (hi * di, c["q_lora_rank"])
        yield f"{p}.self_attn.indexer.wk.weight", (di, h)
        yield f"{p}.self_attn.indexer.k_norm.weight", (di,)
        yield f"{p}.self_attn.indexer.k_norm.bias", (di,)
        yield f"{p}.self_attn.indexer.weights_proj.weight", (hi, h)
    yield f"{p}.self_attn.kv_a_proj_with_mqa.weight", (dc + dr, h)
    yield f"{p}.self_attn.kv_a_layernorm.weight", (dc,)
    yield f"{p}.self_attn.kv_b_proj.weight", (heads * (dn + dv), dc)
    yield f"{p}.self_attn.o_proj.weight", (h, heads * dv)
    if i < c["first_k_dense_replace"]:
        inter = c["intermediate_size"]
        for name, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            yield f"{p}.mlp.{name}.weight", shape
        return
    mi = c["moe_intermediate_size"]
    yield f"{p}.mlp.gate.weight", (c["n_routed_experts"], h)
    for e in range(c["n_routed_experts"]):
        for name, shape in (("gate_proj", (mi, h)), ("up_proj", (mi, h)), ("down_proj", (h, mi))):
            yield f"{p}.mlp.experts.{e}.{name}.weight", shape
    si = mi * c["n_shared_experts"]
    for name, shape in (("gate_proj", (si, h)), ("up_proj", (si, h)), ("down_proj", (h, si))):
        yield f"{p}.mlp.shared_experts.{name}.weight", shape


def bf16_bytes(values):
    """float32 values as bf16 (round to nearest even), little-endian bytes."""
    bits = values.astype(np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.astype("<u2").tobytes()


def write_shard(path, tensors, rng):
    """One safetensors file of bf16 tensors `(name, shape, mean, std)`, each drawn and written in
    turn, so that no more than one tensor is held at a time."""
    header, at = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _, _ in tensors:
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, shape, mean, std in tensors:
            f.write(bf16_bytes(mean + std * rng.standard_normal(shape, dtype=np.float32)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--v32", action="store_true", help="DeepSeek-V3.2's attention (see above)")
    ap.add_argument("--mtp", action="store_true", help="add one multi-token-prediction module (layer index --layers)")
    args = ap.parse_args()

    if args.v32:
        with open(os.path.join(FIXTURES, "configs", "deepseek-v3.2.json")) as f:
            config = json.load(f)
        config.pop("quantization_config")
        layers = args.layers if args.layers != 6 else 2
        config.update(num_hidden_layers=layers, num_nextn_predict_layers=0, vocab_size=4096, intermediate_size=2048,
                      first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=512,
                      n_shared_experts=1, n_group=1, topk_group=1)
    else:
        with open(os.path.join(FIXTURES, "configs", "deepseek-v2-lite.json")) as f:
            config = json.load(f)
        config["num_hidden_layers"] = args.layers
    config["num_nextn_predict_layers"] = 1 if args.mtp else 0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(FIXTURES, "tokenizer", name), args.out)

    rng = np.random.default_rng(args.seed)
    shapes = list(tensor_shapes(config))
    limit = int(args.shard_gb * 2**30)
    # Plan the shards first (names say "-of-N"), then write each one as soon as it is full.
    plan, size = [[]], 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if size + nbytes > limit and plan[-1]:
            plan.append([])
            size = 0
        plan[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, group in enumerate(plan):
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = []
        for name, shape in group:
            std, mean = (0.1, 1.0) if name.endswith("norm.weight") else (0.02, 0.0)
            std, mean = (0.1, 0.0) if name.endswith("norm.bias") else (std, mean)
            tensors.append((name, shape, mean, std))
            weight_map[name] = file
            total += 2 * math.prod(shape)
        write_shard(os.path.join(args.out, file), tensors, rng)
        print(f"wrote {file}: {len(tensors)} tensors", flush=True)
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    print(f"{args.out}: {len(shapes)} tensors, {total / 1e9:.2f} GB in {len(plan)} shards")


if __name__ == "__main__":
    main()
