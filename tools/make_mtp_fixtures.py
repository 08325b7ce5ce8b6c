#!/usr/bin/env python3
"""Writes tests/fixtures/tiny-v3-mtp (a DeepSeek-V3 with one trained multi-token-prediction module)
in the two other forms checkpoints carry MTP modules in:

  tests/fixtures/gguf/tiny-v3-mtp-f32.gguf   a llama.cpp `deepseek2` GGUF with its MTP block, in f32
                                             so that latent must read back the safetensors values
  tests/fixtures/tiny-v3-mtp-fp8/            DeepSeek-V3's block FP8 (e4m3 with a scale per 8 x 8
                                             block at these sizes, 128 x 128 in the real ones), the
                                             MTP layer included, as DeepSeek publishes V3 and R1

    pip install gguf safetensors numpy
    python tools/make_mtp_fixtures.py

FP8: every linear weight of the decoder layers and the MTP layer in e4m3 with `weight_scale_inv`,
except `kv_a_proj_with_mqa` and the router (bf16, as in DeepSeek's files); the embedding and output
head in bf16; norms in f32.

GGUF:
llama.cpp's deepseek2 converter drops the MTP layer, so this file is written with gguf-py (llama.cpp's
own GGUF library) following llama.cpp's convention for MTP blocks (as its GLM-4.5 and DeepSeek
`nextn` loaders read them): `block_count` counts the MTP blocks after the model's own layers,
`deepseek2.nextn_predict_layers` says how many there are, and an MTP block holds an ordinary
decoder layer's tensors (`blk.N.attn_*`, `blk.N.ffn_*`) beside `blk.N.nextn.{eh_proj, enorm, hnorm,
shared_head_norm, shared_head_head, embed_tokens}`.

The tokenizer metadata and the names of the model's keys are taken from
tests/fixtures/gguf/tiny-v3-256-q8_0.gguf, which llama.cpp's converter wrote for a checkpoint with
the same tokenizer; the script checks that it writes every deepseek2 key that file has (apart from
the YaRN ones: this model has no rope scaling). `kv_b_proj` is split per head into `attn_k_b` and
`attn_v_b` as llama.cpp's newer converters split it.
"""
import json
import math
import os
import shutil
import struct

import gguf
import numpy as np
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")
SOURCE = os.path.join(FIXTURES, "tiny-v3-mtp")
TEMPLATE = os.path.join(FIXTURES, "gguf", "tiny-v3-256-q8_0.gguf")
OUT = os.path.join(FIXTURES, "gguf", "tiny-v3-mtp-f32.gguf")
FP8_OUT = os.path.join(FIXTURES, "tiny-v3-mtp-fp8")
FP8_BLOCK = 8
ARCH = "deepseek2"

# Hugging Face name (after `model.layers.N.`) -> llama.cpp name (after `blk.N.`).
LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "eh_proj.weight": "nextn.eh_proj.weight",
    "enorm.weight": "nextn.enorm.weight",
    "hnorm.weight": "nextn.hnorm.weight",
    "shared_head.norm.weight": "nextn.shared_head_norm.weight",
    "shared_head.head.weight": "nextn.shared_head_head.weight",
    "embed_tokens.weight": "nextn.embed_tokens.weight",
}


def e4m3_table():
    """The value of every e4m3fn byte below 0x7f (the positive ones, increasing)."""
    values = []
    for b in range(0x7F):
        e, m = b >> 3, b & 7
        values.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(values, dtype=np.float64)


def to_e4m3(x):
    """The nearest e4m3fn byte of each value (ties to the even code), for values within +-448."""
    table = e4m3_table()
    mag = np.abs(x.astype(np.float64))
    hi = np.clip(np.searchsorted(table, mag), 1, len(table) - 1)
    lo = hi - 1
    d_lo, d_hi = mag - table[lo], table[hi] - mag
    pick = np.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo).astype(np.uint8)
    return np.where(x < 0, pick | 0x80, pick).astype(np.uint8)


def bf16_bytes(values):
    bits = values.astype(np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.astype("<u2").tobytes()


def write_safetensors(path, tensors):
    """`tensors`: name -> (safetensors dtype, shape, bytes), written in name order."""
    header, at = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + len(data)]}
        at += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in sorted(tensors):
            f.write(tensors[name][2])


def write_fp8(c, w):
    shutil.rmtree(FP8_OUT, ignore_errors=True)
    os.makedirs(FP8_OUT)
    out = {}
    for name, value in w.items():
        layer = name.startswith("model.layers.")
        fp8 = (layer and value.ndim == 2 and name.endswith("proj.weight")
               and "kv_a_proj_with_mqa" not in name)
        if fp8:
            rows, cols = value.shape
            assert rows % FP8_BLOCK == 0 and cols % FP8_BLOCK == 0, name
            blocks = value.reshape(rows // FP8_BLOCK, FP8_BLOCK, cols // FP8_BLOCK, FP8_BLOCK)
            scale = np.abs(blocks).max(axis=(1, 3)) / 448.0
            scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
            q = to_e4m3(blocks / scale[:, None, :, None]).reshape(rows, cols)
            out[name] = ("F8_E4M3", value.shape, q.tobytes())
            out[name + "_scale_inv"] = ("F32", scale.shape, scale.astype("<f4").tobytes())
        elif value.ndim == 2:
            out[name] = ("BF16", value.shape, bf16_bytes(value))
        else:
            out[name] = ("F32", value.shape, value.astype("<f4").tobytes())
    write_safetensors(os.path.join(FP8_OUT, "model.safetensors"), out)
    config = dict(c, torch_dtype="bfloat16")
    config.pop("dtype", None)
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    with open(os.path.join(FP8_OUT, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(SOURCE, name), FP8_OUT)
    n = sum(1 for v in out.values() if v[0] == "F8_E4M3")
    print(f"wrote {FP8_OUT}: {n} FP8 weights")


def main():
    with open(os.path.join(SOURCE, "config.json")) as f:
        c = json.load(f)
    assert c["model_type"] == "deepseek_v3" and c["num_nextn_predict_layers"] > 0 and c["q_lora_rank"]
    assert "rope_scaling" not in c and "rope_parameters" not in c, "this script writes no YaRN keys"
    w = load_file(os.path.join(SOURCE, "model.safetensors"))
    template = gguf.GGUFReader(TEMPLATE)
    n_main, nextn = c["num_hidden_layers"], c["num_nextn_predict_layers"]
    heads, rank = c["num_attention_heads"], c["kv_lora_rank"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]

    writer = gguf.GGUFWriter(OUT, ARCH)
    writer.add_name("tiny-v3-mtp")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    keys = {
        "block_count": n_main + nextn,
        "nextn_predict_layers": nextn,
        "context_length": c["max_position_embeddings"],
        "embedding_length": c["hidden_size"],
        "feed_forward_length": c["intermediate_size"],
        "attention.head_count": heads,
        "attention.head_count_kv": 1,
        "rope.freq_base": float(c["rope_theta"]),
        "attention.layer_norm_rms_epsilon": float(c["rms_norm_eps"]),
        "expert_count": c["n_routed_experts"],
        "expert_used_count": c["num_experts_per_tok"],
        "expert_group_count": c["n_group"],
        "expert_group_used_count": c["topk_group"],
        "expert_gating_func": 2 if c["scoring_func"] == "sigmoid" else 1,
        # The absorbed (MQA-like) form in the plain keys, the per-head MLA sizes in `*_mla`.
        "attention.key_length": rank + rope,
        "attention.value_length": rank,
        "attention.key_length_mla": nope + rope,
        "attention.value_length_mla": v,
        "leading_dense_block_count": c["first_k_dense_replace"],
        "vocab_size": c["vocab_size"],
        "attention.q_lora_rank": c["q_lora_rank"],
        "attention.kv_lora_rank": rank,
        "expert_feed_forward_length": c["moe_intermediate_size"],
        "expert_shared_count": c["n_shared_experts"],
        "expert_weights_scale": float(c["routed_scaling_factor"]),
        "expert_weights_norm": bool(c["norm_topk_prob"]),
        "rope.dimension_count": rope,
    }
    wanted = {k[len(ARCH) + 1 :] for k in template.fields if k.startswith(ARCH + ".")}
    missing = {k for k in wanted - keys.keys() if not k.startswith("rope.scaling.")}
    assert not missing, f"keys llama.cpp writes that this script does not: {sorted(missing)}"
    for key, value in keys.items():
        full = f"{ARCH}.{key}"
        if isinstance(value, bool):
            writer.add_bool(full, value)
        elif isinstance(value, float):
            writer.add_float32(full, value)
        else:
            writer.add_uint32(full, value)
    # The tokenizer: the same one, as llama.cpp's converter wrote it.
    for key, field in template.fields.items():
        if not key.startswith("tokenizer."):
            continue
        types = field.types
        sub = types[1] if types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), types[0], sub_type=sub)

    def put(name, array):
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))

    put("token_embd.weight", w["model.embed_tokens.weight"])
    put("output_norm.weight", w["model.norm.weight"])
    put("output.weight", w["lm_head.weight"])
    for i in range(n_main + nextn):
        prefix = f"model.layers.{i}."
        for hf, name in LAYER.items():
            if prefix + hf in w:
                put(f"blk.{i}.{name}", w[prefix + hf])
        kv_b = w[prefix + "self_attn.kv_b_proj.weight"].reshape(heads, nope + v, rank)
        put(f"blk.{i}.attn_k_b.weight", kv_b[:, :nope, :].transpose(0, 2, 1))
        put(f"blk.{i}.attn_v_b.weight", kv_b[:, nope:, :])
        experts = [k for k in w if k.startswith(prefix + "mlp.experts.")]
        if experts:
            n = c["n_routed_experts"]
            for proj in ("gate", "up", "down"):
                stacked = np.stack([w[f"{prefix}mlp.experts.{e}.{proj}_proj.weight"] for e in range(n)])
                put(f"blk.{i}.ffn_{proj}_exps.weight", stacked)
        unused = [k for k in w if k.startswith(prefix)
                  and k[len(prefix):] not in LAYER
                  and not k.startswith(prefix + "mlp.experts.")
                  and k != prefix + "self_attn.kv_b_proj.weight"]
        assert not unused, f"tensors without a GGUF name: {unused}"

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes): {n_main} layers and {nextn} MTP block(s)")
    write_fp8(c, w)


if __name__ == "__main__":
    main()
