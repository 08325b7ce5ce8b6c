#!/usr/bin/env python3
"""Writes the GGUF fixtures under tests/fixtures/gguf/ with llama.cpp's own tools.

    python tools/make_gguf_fixtures.py LLAMA_CPP_DIR      (tools/llama_cpp.sh builds one)

Files:
  tiny-v3-256/                 a DeepSeek-V3-shaped checkpoint (bf16 safetensors) whose rows are
                               multiples of 256, so that llama.cpp's k-quants apply: q_lora, YaRN,
                               sigmoid + noaux_tc routing with a bias, groups, a dense first layer
  gguf/tiny-v3-256-q8_0.gguf   convert_hf_to_gguf.py --outtype q8_0
  gguf/tiny-v3-256-q4_k_m.gguf llama-quantize Q4_K_M of the bf16 conversion (Q4_K, Q6_K, and the
                               32-value fallbacks for short rows)
  gguf/tiny-v2-lite-f16.gguf   tests/fixtures/tiny-v2-lite converted to f16 (split attn_k_b/attn_v_b)
  gguf/dequant.safetensors     for each file and each GGML type in it, the first 2048 values of one tensor
                               dequantized by llama.cpp's gguf-py (`{file}/{tensor}`), the values latent must read
  gguf/meta.json               the llama.cpp version used
"""
import json
import os
import shutil
import subprocess
import sys

import torch
import transformers
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "tests", "fixtures")


def run(cmd):
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    llama = os.path.abspath(sys.argv[1])
    sys.path.insert(0, os.path.join(llama, "gguf-py"))
    import gguf
    from gguf.quants import dequantize

    out = os.path.join(ROOT, "gguf")
    os.makedirs(out, exist_ok=True)
    model_dir = os.path.join(ROOT, "tiny-v3-256")
    shutil.rmtree(model_dir, ignore_errors=True)
    config = transformers.DeepseekV3Config(
        vocab_size=320, hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
        n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=256, kv_lora_rank=256,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=128, max_position_embeddings=512,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 0.707, "mscale_all_dim": 0.707},
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, rope_interleave=True,
    )
    torch.manual_seed(11)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    # Narrower than the other fixtures' init: a random net this wide with 0.08 weights is chaotic
    # enough that 4-bit noise moves its logits by half their size, which says nothing about the format.
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name else 0.03 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.5 * torch.randn(b.shape, generator=g))
    model.to(torch.bfloat16).save_pretrained(model_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ROOT, "tokenizer", f), model_dir)
    # Spell out the router as DeepSeek's published V3 config does (transformers' V3 implies it, and
    # llama.cpp's converter writes `expert_gating_func` only from `scoring_func`); no MTP layer.
    cfg_path = os.path.join(model_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(scoring_func="sigmoid", topk_method="noaux_tc", num_nextn_predict_layers=0)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    gen = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)

    convert = [sys.executable, os.path.join(HERE, "convert_gguf.py"), llama]
    quantize = os.path.join(llama, "build", "bin", "llama-quantize")
    bf16 = os.path.join(out, "tiny-v3-256-bf16.gguf")
    files = {
        "tiny-v3-256-q8_0.gguf": convert + [model_dir, "--outtype", "q8_0", "--outfile"],
        "tiny-v2-lite-f16.gguf": convert + [os.path.join(ROOT, "tiny-v2-lite"), "--outtype", "f16", "--outfile"],
    }
    for name, cmd in files.items():
        run(cmd + [os.path.join(out, name)])
    run(convert + [model_dir, "--outtype", "bf16", "--outfile", bf16])
    run([quantize, bf16, os.path.join(out, "tiny-v3-256-q4_k_m.gguf"), "Q4_K_M"])
    os.remove(bf16)

    tensors = {}
    for name in ("tiny-v3-256-q8_0.gguf", "tiny-v3-256-q4_k_m.gguf", "tiny-v2-lite-f16.gguf"):
        reader = gguf.GGUFReader(os.path.join(out, name))
        seen = set()
        for t in reader.tensors:
            kind = t.tensor_type.name
            if kind in seen:
                continue
            seen.add(kind)
            values = dequantize(t.data, t.tensor_type)
            # The first 2048 values (in file order) are plenty to pin down the block decoding.
            flat = values.astype("float32").reshape(-1)[:2048].copy()
            tensors[f"{name}/{t.name}"] = torch.from_numpy(flat).contiguous()
            print(f"{name}: {t.name} {kind} {list(values.shape)}", file=sys.stderr)
    save_file(tensors, os.path.join(out, "dequant.safetensors"))
    version = subprocess.run([os.path.join(llama, "build", "bin", "llama-bench"), "--version"],
                             capture_output=True, text=True)
    build = (version.stdout + version.stderr).splitlines()[:1]
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"llama_cpp": build, "transformers": transformers.__version__}, f, indent=2)


if __name__ == "__main__":
    main()
