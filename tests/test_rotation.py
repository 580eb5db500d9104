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
    layer = model.model.layers[0]
    embed = model.model.embed_tokens.weight.clone()
    q_proj, o_proj = layer.self_attn.q_proj.weight.clone(), layer.self_attn.o_proj.weight.clone()
    gamma = layer.input_layernorm.weight.clone()
    rotation = rotate_in_place(model)
    after = model(input_ids=ids).logits
    # transformers computes RMSNorm statistics and RoPE in fp32 even for fp64 models: fp32 rounding remains
    assert (after - before).abs().max().item() < 2e-6 * before.abs().max().item()
    Q = rotation.Q.to(torch.float64)
    eye = torch.eye(Q.shape[0], dtype=torch.float64)
    torch.testing.assert_close(Q.t() @ Q, eye, rtol=0, atol=1e-12)  # orthogonal
    # a real change of basis: every residual direction spread over all channels (a permutation or
    # the identity has entries of 1; Hadamard's are all ±1/√C)
    assert Q.abs().max().item() < 0.5
    # the weights are the originals in the rotated basis: E Q, W diag(γ) Q for readers, Qᵀ W for writers
    torch.testing.assert_close(model.model.embed_tokens.weight, embed @ Q, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.self_attn.q_proj.weight, q_proj * gamma @ Q, rtol=0, atol=1e-12)
    R2 = torch.block_diag(*[rotation.R2.double()] * (o_proj.shape[1] // rotation.head_dim))  # per head
    torch.testing.assert_close(layer.self_attn.o_proj.weight, Q.t() @ o_proj @ R2, rtol=0, atol=1e-12)
    assert torch.all(layer.input_layernorm.weight == 1)
    if overrides.get("tie_word_embeddings"):
        assert model.config.tie_word_embeddings is False
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def max_over_rms(w: torch.Tensor) -> float:
    """Peak-to-RMS ratio of all entries of w: ≈ √(2 ln n) for n Gaussian entries, large with outliers."""
    return (w.abs().max() / w.square().mean().sqrt()).item()


def test_rotation_spreads_outliers(tmp_path):
    """An outlier input channel of q_proj is spread over all channels: after rotation the weights'
    peak-to-RMS ratio is that of Gaussian weights, and the layer computes the same function."""
    folder = make_tiny_model(tmp_path / "m", "llama", hidden=128)
    model, _, _ = load_model(str(folder), dtype=torch.float64)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:, 3] *= 50  # an outlier input channel
    w = model.model.layers[0].self_attn.q_proj.weight.clone()
    gaussian = max_over_rms(torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert max_over_rms(w) > 5 * gaussian
    rotation = rotate_in_place(model)
    rotated = model.model.layers[0].self_attn.q_proj.weight
    assert max_over_rms(rotated) < 1.5 * gaussian
    x = torch.randn(16, w.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close((x @ rotation.Q.double()) @ rotated.t(), x @ w.t(), rtol=0, atol=1e-10)  # norm γ = 1 here


def test_rotate_refuses_unfoldable_norms(tmp_path):
    folder = make_tiny_model(tmp_path / "m", "llama")
    model, _, _ = load_model(str(folder))
    adapter = adapter_for(model.config)
    model.model.layers[1].post_attention_layernorm = torch.nn.LayerNorm(model.config.hidden_size)
    with pytest.raises(QuantkitError, match="layer 1 post_attention_layernorm"):
        adapter.check_foldable(model)
