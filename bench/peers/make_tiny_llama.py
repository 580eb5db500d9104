#!/usr/bin/env python
"""Build a tiny random Llama checkpoint locally (no hub access).

    python bench/peers/make_tiny_llama.py OUT_DIR [--dtype float16] [--seed 0]

Writes config.json + model.safetensors (+ generation_config.json) and a tiny
word-level fast tokenizer (tokenizer.json; tokens "<pad>", "<s>", "</s>",
"w3".."w{vocab-1}"), because GPTQModel.load() insists on loading a tokenizer.
Peers are fed random token ids directly. Prints JSON facts.
"""
import argparse
import json
import os


def save_tokenizer(out_dir, vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<pad>")
    fast.save_pretrained(out_dir)


def build(out_dir, dtype="float16", seed=0, hidden=128, inter=256, layers=2,
          heads=4, kv_heads=2, vocab=512, max_pos=256, bias=False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        tie_word_embeddings=False,
        attention_bias=bias,
        mlp_bias=bias,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    # Default HF init (std 0.02) makes every Linear's weights near-identical in
    # scale; widen the spread a little so per-group scales differ visibly.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(1.0 + torch.rand(p.shape[0], 1) * 2.0)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.05)
    model = model.to(getattr(torch, dtype))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(out_dir, vocab)
    return {
        "out_dir": os.path.abspath(out_dir),
        "dtype": dtype,
        "seed": seed,
        "bias": bias,
        "config": {k: getattr(cfg, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")},
        "files": sorted(os.listdir(out_dir)),
    }


def edge_group_copy(src, dst, group_size):
    """Copy model `src` to `dst`, forcing, in every decoder Linear, input group 0
    of output rows 0..7 to be all >= 0 and of rows 8..15 all <= 0, so that
    asymmetric quantizers produce zero points at both ends of their range
    (GPTQ: zero=0 and zero=2**bits-1; compressed-tensors: zp=-2**(b-1) and
    2**(b-1)-1). Exercises zero-point offset/overflow edge cases."""
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst, dirs_exist_ok=True)
    sd = load_file(os.path.join(src, "model.safetensors"))
    for k, v in sd.items():
        if k.startswith("model.layers.") and k.endswith("proj.weight"):
            v[0:8, 0:group_size] = v[0:8, 0:group_size].abs()
            v[8:16, 0:group_size] = -v[8:16, 0:group_size].abs()
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--bias", action="store_true", help="attention_bias=mlp_bias=True (Linear biases)")
    a = ap.parse_args()
    print(json.dumps(build(a.out_dir, a.dtype, a.seed, vocab=a.vocab, layers=a.layers, bias=a.bias), indent=2))


if __name__ == "__main__":
    main()
