#!/usr/bin/env python3
"""Runs llama.cpp's own converter (convert_hf_to_gguf.py) on a DeepSeek checkpoint.

    python tools/convert_gguf.py LLAMA_CPP_DIR MODEL_DIR --outfile OUT.gguf --outtype f16|bf16|q8_0

Two changes to the converter, both to metadata:
- a tokenizer whose pre-tokenizer it does not recognise by hash (the byte-level BPE tokenizers
  latent trains and the fixtures use: GPT-2's split regex) is written with
  `tokenizer.ggml.pre = gpt-2` instead of being refused (DeepSeek's published tokenizers are
  recognised by the converter itself);
- a checkpoint without query compression (`q_lora_rank: null`, as V2-Lite) gets
  `deepseek2.attention.q_lora_rank = 0`: llama.cpp's loader recognises V2-Lite by its layer count
  (26 or 27) and otherwise requires the key, so a V2-Lite-shaped model with fewer layers would not
  load without it. The tensors are untouched.
"""
import os
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    llama = Path(sys.argv[1]).resolve()
    args = sys.argv[2:]
    args[0] = str(Path(args[0]).resolve())
    if "--outfile" in args:
        i = args.index("--outfile") + 1
        args[i] = str(Path(args[i]).resolve())
    sys.path.insert(0, str(llama))
    sys.path.insert(1, str(llama / "gguf-py"))
    os.chdir(llama)
    import convert_hf_to_gguf  # noqa: E402
    from conversion import base  # noqa: E402

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre

    from conversion import deepseek  # noqa: E402

    set_params = deepseek.DeepseekV2Model.set_gguf_parameters

    def set_gguf_parameters(self):
        set_params(self)
        if self.hparams.get("q_lora_rank") is None:
            self.gguf_writer.add_q_lora_rank(0)

    deepseek.DeepseekV2Model.set_gguf_parameters = set_gguf_parameters
    sys.argv = [str(llama / "convert_hf_to_gguf.py")] + args
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
