"""Fused rotations leave the FP model's function unchanged (fp64), for Llama and Qwen2 (q/k/v biases)."""

import pytest
import torch

from conftest import make_tiny_model
from quantkit.errors import QuantkitError
from quantkit.fuse import rotate_layer
from quantkit.model import adapter_for, load_model
from quantkit.methods.rotate import Rotation, prepare_rotation
from quantkit.recipe import Recipe


def rotate_in_place(model, seed=0) -> Rotation:
    adapter = adapter_for(model.config)
    rotation = prepare_rotation(model, adapter, Recipe(rotate=True, rotation_seed=seed))
    for layer in adapter.layers(model):
        rotate_layer(layer, adapter, rotation.Q, rotation.R2, rotation.head_dim)
    return rotation


@pytest.mark.parametrize(
    "model_type,overrides",
    [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen2", {}), ("mistral", {}), ("qwen3", {"head_dim": 32})],
    ids=["llama", "llama-tied", "qwen2-bias", "mistral", "qwen3-qknorm"],
)
def test_rotated_model_has_same_logits(tmp_path, model_type, overrides):
    folder = make_tiny_model(tmp_path / model_type, model_type, hidden=96, **overrides)
    model, _, _ = load_model(str(folder), dtype=torch.float64)
    with torch.no_grad():  # make norms and biases non-trivial so folding them is exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    rotation = rotate_in_place(model)
    after = model(input_ids=ids).logits
    # transformers computes RMSNorm statistics and RoPE in fp32 even for fp64 models: fp32 rounding remains
    assert (after - before).abs().max().item() < 2e-6 * before.abs().max().item()
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight @ rotation.Q.t())
    assert torch.all(model.model.layers[0].input_layernorm.weight == 1)
    if overrides.get("tie_word_embeddings"):
        assert model.config.tie_word_embeddings is False
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_rotation_spreads_outliers(tmp_path):
    folder = make_tiny_model(tmp_path / "m", "llama", hidden=128)
    model, _, _ = load_model(str(folder), dtype=torch.float64)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:, 3] *= 50  # an outlier input channel
    w = model.model.layers[0].self_attn.q_proj.weight
    kurt_before = (w.abs().max() / w.abs().mean()).item()
    rotate_in_place(model)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert (w.abs().max() / w.abs().mean()).item() < kurt_before / 3


def test_rotate_refuses_unfoldable_norms(tmp_path):
    folder = make_tiny_model(tmp_path / "m", "llama")
    model, _, _ = load_model(str(folder))
    adapter = adapter_for(model.config)
    model.model.layers[1].post_attention_layernorm = torch.nn.LayerNorm(model.config.hidden_size)
    with pytest.raises(QuantkitError, match="layer 1 post_attention_layernorm"):
        adapter.check_foldable(model)
