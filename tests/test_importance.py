import pytest
import torch

from quantkit.algos.importance import (
    REFERENCE_LENGTH,
    activation_norm,
    attention_concentration,
    first_last,
    effective_tokens,
    hessian_split,
    length_invariant_floor,
    map_importance,
)
from quantkit.errors import QuantkitError
from quantkit.recipe import PRESETS, Recipe

B, HQ, HKV, T, D = 2, 6, 2, 37, 8


def _naive(q, k, scaling, mask=None):
    """Full [B, Hq, T, T] attention with kv heads repeated; mask additive [B, 1, T, T]."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) * scaling
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1).nan_to_num().sum((1, 2))


@pytest.fixture
def qk():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, HQ, T, D, generator=g), torch.randn(B, HKV, T, D, generator=g)


@pytest.mark.parametrize("chunk", [1, 8, 37, 256])
def test_chunked_matches_full_softmax(qk, chunk):
    q, k = qk
    r = attention_concentration(q, k, D**-0.5, chunk=chunk)
    assert r.shape == (B, T) and r.dtype == torch.float32
    assert torch.allclose(r, _naive(q, k, D**-0.5), rtol=1e-5, atol=1e-5)
    # every query's attention sums to 1, so the scores total Hq·T per sample
    assert torch.allclose(r.sum(-1), torch.full((B,), float(HQ * T)), rtol=1e-5)


def test_padding_mask_bool_and_additive_agree(qk):
    q, k = qk
    pad = torch.tensor([3, 0])  # left padding per sample
    keep = (torch.arange(T) >= pad[:, None])[:, None, None, :].expand(B, 1, T, T)
    additive = torch.zeros(B, 1, T, T).masked_fill(~keep, float("-inf"))
    r_bool = attention_concentration(q, k, 0.3, attention_mask=keep, chunk=8)
    r_add = attention_concentration(q, k, 0.3, attention_mask=additive, chunk=8)
    assert torch.allclose(r_bool, r_add) and torch.isfinite(r_bool).all()
    assert torch.allclose(r_bool, _naive(q, k, 0.3, additive), rtol=1e-5, atol=1e-5)
    assert (r_bool[0, :3] == 0).all()  # padded keys get nothing; padded queries see nothing
    assert torch.allclose(r_bool.sum(-1), HQ * (T - pad).float(), rtol=1e-5)


def test_uneven_heads_rejected(qk):
    q, _ = qk
    with pytest.raises(ValueError):
        attention_concentration(q, torch.randn(B, 4, T, D), 1.0)


def test_activation_norm():
    x = torch.randn(2, 5, 7, dtype=torch.float16)
    assert torch.allclose(activation_norm(x), x.float().pow(2).sum(-1).sqrt())


def test_first_last():
    third = 1 / 3
    expected = torch.tensor([1, 2 * third, third, 0, 0, 0, 0, third, 2 * third, 1])
    assert torch.allclose(first_last(10, n=3), expected)
    assert torch.allclose(first_last(4, n=3), torch.tensor([1, 2 * third, 2 * third, 1]))


def test_map_importance():
    r = torch.rand(3, 50, generator=torch.Generator().manual_seed(0)) ** 3 * 100
    low, high = 0.01, 2.0
    w = map_importance(r, low, high)
    assert torch.allclose(w.mean(-1), torch.ones(3))
    # before renormalisation min → low and max → high, linearly in between
    scale = w.amax(-1, keepdim=True) / high
    assert torch.allclose(w.amin(-1, keepdim=True) / scale, torch.full((3, 1), low))
    assert torch.equal(w.argmin(-1), r.argmin(-1)) and torch.equal(w.argmax(-1), r.argmax(-1))
    unit = (r - r.amin(-1, keepdim=True)) / (r.amax(-1, keepdim=True) - r.amin(-1, keepdim=True))
    assert torch.allclose(w / scale, low + (high - low) * unit)


def test_map_importance_constant_and_bad_range():
    r = torch.stack([torch.full((8,), 5.0), torch.arange(8.0)])
    w = map_importance(r)
    assert torch.equal(w[0], torch.ones(8))
    assert torch.allclose(w[1].mean(), torch.tensor(1.0))
    assert torch.equal(map_importance(r, low=0.0)[0], torch.ones(8))
    assert map_importance(r, low=0.0)[1, 0] == 0
    for low, high in [(-0.1, 1.0), (2.0, 1.0), (0.0, 0.0)]:
        with pytest.raises(ValueError):
            map_importance(r, low, high)


def sink_attention(t: int, seed: int = 0) -> torch.Tensor:
    """Attention concentration [1, t] of random queries/keys plus an attention sink at position 0
    that takes about the same share (~12–15%) of every query's attention at any length: query i's
    logit for key 0 is log(i + 1) + 0.5, matching the i + 1 random keys it competes with."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 2, t, 8, generator=g), torch.randn(1, 1, t, 8, generator=g)
    q[..., 0] = torch.log(torch.arange(1, t + 1.0)) + 0.5
    k[..., 0] = 0
    k[:, :, 0] = torch.eye(8)[0]
    return attention_concentration(q, k, 1.0)


def test_length_invariant_split_on_synthetic_attention():
    """The floor/sink split of Σ w_t is the same at 256 and 4096 tokens with the length-invariant
    floor, and moves several-fold with the authors' fixed range."""
    split = {}
    for t in (256, 4096):
        r = sink_attention(t)
        assert r.argmax() == 0
        for name, reference in (("fixed", None), ("invariant", REFERENCE_LENGTH)):
            w = map_importance(r, 0.005, 1.0, reference)
            split[name, t] = [s.item() for s in hessian_split(w, torch.ones_like(w))]
    (sink_short, floor_short), (sink_long, floor_long) = split["invariant", 256], split["invariant", 4096]
    assert sink_short == pytest.approx(sink_long, rel=0.2) and floor_short == pytest.approx(floor_long, abs=0.1)
    assert split["fixed", 4096] == split["invariant", 4096]  # the reference length is the authors' setting
    (sink_short, floor_short), (sink_long, floor_long) = split["fixed", 256], split["fixed", 4096]
    assert sink_short > 3 * sink_long and floor_long - floor_short > 0.5


def test_length_invariant_floor_scales_with_the_window():
    r = torch.rand(2, 512, generator=torch.Generator().manual_seed(1))
    assert length_invariant_floor(0.005, 1.0, 512) == pytest.approx(0.04)
    assert torch.allclose(map_importance(r, 0.005, 1.0, REFERENCE_LENGTH), map_importance(r, 0.04, 1.0))
    assert torch.equal(map_importance(r[:, :16], 0.005, 1.0, REFERENCE_LENGTH), torch.ones(2, 16))  # capped at high
    w = torch.tensor([[4.0, 1.0, 1.0, 2.5]])
    sink, floor = hessian_split(w, torch.tensor([[1.0, 2.0, 1.0, 1.0]]))
    assert sink.item() == pytest.approx(4 / 9.5) and floor.item() == pytest.approx(3 / 9.5)


def test_recipe_resolves_and_checks_the_mapping():
    assert Recipe().importance_map == "length-invariant"
    assert Recipe(importance="actnorm").importance_map == "fixed"
    assert Recipe(importance="attncon", importance_map="fixed").importance_map == "fixed"
    with pytest.raises(QuantkitError, match="--importance-map length-invariant is for --importance attncon"):
        Recipe(importance="first-last", importance_map="length-invariant")
    paper = Recipe.from_dict(PRESETS["rsq-paper"])
    assert (paper.bits, paper.group_size, paper.sym, paper.act_order, paper.rotate) == (3, -1, True, False, True)
    assert (paper.clip_search, paper.importance, paper.importance_map, paper.seqlen, paper.awq) == (
        True, "attncon", "length-invariant", 4096, False)


def test_model_card_names_the_mapping():
    from quantkit.export.card import model_card

    def card(**kw):
        return model_card({"quantization_config": {}}, Recipe(bits=3, format="compressed-tensors", **kw), {})

    assert "attention-concentration token importance (length-invariant floor 0.04 at 512-token windows, 0.005 at 4096)" in card()
    assert "attention-concentration token importance (fixed range [0.005, 1])" in card(importance_map="fixed")
    assert "activation-norm token importance (fixed range [0.005, 1])" in card(importance="actnorm")


def test_effective_tokens():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0], [2.0, 1.0, 1.0, 0.0]])
    assert torch.allclose(effective_tokens(w), torch.tensor([4.0, 1.0, 16 / 6]))
    r = sink_attention(512)
    fixed, invariant = (effective_tokens(map_importance(r, 0.005, 1.0, ref)).item() for ref in (None, REFERENCE_LENGTH))
    assert fixed < invariant < 512  # the fixed floor at 512 tokens leaves fewer tokens carrying H
