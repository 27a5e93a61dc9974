"""The LLaMA model: shapes, causality, RoPE, GQA, document masking, KV cache, init, counts."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models.llama import (
    KVCache,
    Transformer,
    _sdpa,
    apply_rotary,
    build_model,
    check_initialized,
    count_params,
    ffn_hidden_dim,
    flops_per_token,
    rope_table,
)
from pretrain.validate import validate_model

CONF_MODEL = Path(__file__).resolve().parents[2] / "conf" / "model"


def tiny(**overrides: object) -> ModelConfig:
    base = dict(name="tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                multiple_of=16, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


def built(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return build_model(cfg, device="cpu")


def load_preset(name: str) -> ModelConfig:
    preset = OmegaConf.load(CONF_MODEL / f"{name}.yaml")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), preset)
    return OmegaConf.to_object(merged)


def tokens(B: int, T: int, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- forward


def test_logits_shape_and_dtype() -> None:
    model = built(tiny())
    logits = model(tokens(3, 11))
    assert logits.shape == (3, 11, 64)
    assert logits.dtype == torch.float32


def test_changing_a_future_token_never_changes_earlier_logits() -> None:
    model = built(tiny())
    x = tokens(2, 16)
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 64
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-4


def test_explicit_positions_match_the_default_in_both_shapes() -> None:
    model = built(tiny())
    x = tokens(2, 10)
    default = model(x)
    torch.testing.assert_close(model(x, positions=torch.arange(10)), default)
    torch.testing.assert_close(model(x, positions=torch.arange(10).expand(2, 10)), default)


def test_positions_matter_only_through_their_differences() -> None:
    model = built(tiny())
    x = tokens(2, 10)
    default = model(x)
    shifted = model(x, positions=torch.arange(10) + 7)  # RoPE is relative: same logits
    torch.testing.assert_close(shifted, default, atol=1e-4, rtol=1e-4)
    gaps = torch.stack([torch.arange(10), torch.tensor([0, 1, 2, 3, 4, 20, 21, 22, 23, 24])])
    per_row = model(x, positions=gaps)
    torch.testing.assert_close(per_row[0], default[0])
    torch.testing.assert_close(per_row[1, :5], default[1, :5])
    assert (per_row[1, 5:] - default[1, 5:]).abs().max() > 1e-3


def test_too_long_input_names_max_seq_len() -> None:
    model = built(tiny(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 9))


def test_pipeline_stages_compose_to_the_whole_model() -> None:
    model = built(tiny(n_layers=3))
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    del first.layers["2"]
    first.norm, first.output = None, None
    del last.layers["0"], last.layers["1"]
    last.tok_embeddings = None
    x = tokens(2, 8)
    torch.testing.assert_close(last(first(x)), model(x))


# -------------------------------------------------------------------------------- RoPE


def _rotated(x: torch.Tensor, table: torch.Tensor, pos: int) -> torch.Tensor:
    return apply_rotary(x, table[pos][None, None, None, :])  # x: (1, 1, 1, head_dim)


@pytest.mark.parametrize("scaling", [None, 4.0])
def test_rope_scores_depend_only_on_relative_position(scaling: float | None) -> None:
    cfg = tiny(dim=64, n_heads=4, max_seq_len=256, rope_scaling_factor=scaling,
               rope_original_max_seq_len=32)
    table = rope_table(cfg)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 16, generator=gen)

    def score(m: int, n: int) -> torch.Tensor:
        return (_rotated(q, table, m) * _rotated(k, table, n)).sum()

    torch.testing.assert_close(score(5, 2), score(103, 100), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(score(0, 7), score(200, 207), atol=1e-4, rtol=1e-4)
    assert (score(5, 2) - score(5, 4)).abs() > 1e-3


def test_rope_preserves_norms() -> None:
    table = rope_table(tiny(max_seq_len=128))
    x = torch.randn(2, 128, 3, 8)  # (B, T, H, head_dim)
    rotated = apply_rotary(x, table[None, :, None, :])
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(rotated[:, 1:], x[:, 1:])


# --------------------------------------------------------------------------------- GQA


def test_gqa_equals_mha_with_repeated_kv_weights() -> None:
    gqa_cfg = tiny(n_heads=4, n_kv_heads=2)
    gqa = built(gqa_cfg)
    mha = Transformer(dataclasses.replace(gqa_cfg, n_kv_heads=None))
    head_dim, n_rep = 32 // 4, 2
    state = gqa.state_dict()
    for key, w in list(state.items()):
        if key.endswith(("wk.weight", "wv.weight")):
            # (n_kv * head_dim, dim) -> (n_heads * head_dim, dim); query head h uses KV h // n_rep
            heads = w.view(-1, head_dim, w.shape[1])
            state[key] = heads.repeat_interleave(n_rep, dim=0).reshape(-1, w.shape[1])
    mha.load_state_dict(state)
    x = tokens(2, 12)
    torch.testing.assert_close(mha(x), gqa(x), atol=1e-5, rtol=1e-5)


def test_half_precision_gqa_path_equals_repeated_heads() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 8, generator=gen).bfloat16()
    k, v = torch.randn(2, 2, 2, 10, 8, generator=gen).bfloat16()
    fused = _sdpa(q, k, v, None)  # enable_gqa branch
    repeated = _sdpa(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), None)
    torch.testing.assert_close(fused.float(), repeated.float(), atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------- document masks


def _block_causal(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal causal mask (T, T) and per-document positions (T,)."""
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    T = doc.numel()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    positions = torch.cat([torch.arange(n) for n in lengths])
    return causal & (doc[:, None] == doc[None, :]), positions


def test_block_diagonal_mask_equals_documents_run_separately() -> None:
    model = built(tiny())
    splits = [[5, 7], [3, 4, 5]]
    masks, positions = zip(*(_block_causal(s) for s in splits))
    x = tokens(2, 12)
    packed = model(x, positions=torch.stack(positions), attn_mask=torch.stack(masks)[:, None])
    for b, lengths in enumerate(splits):
        start = 0
        for n in lengths:
            alone = model(x[b : b + 1, start : start + n])
            torch.testing.assert_close(packed[b, start : start + n], alone[0], atol=1e-5, rtol=1e-5)
            start += n


# ----------------------------------------------------------------------------- KV cache


def test_kv_cache_chunks_reproduce_the_full_forward() -> None:
    model = built(tiny())
    x = tokens(2, 14)
    cache = KVCache.for_model(model, batch_size=2, max_len=14)
    chunks = [model(x[:, a:b], kv_cache=cache) for a, b in [(0, 5), (5, 6), (6, 9), (9, 14)]]
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(chunks, dim=1), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KVCache"):
        model(x[:, :1], kv_cache=cache)


# -------------------------------------------------------------------------------- init


def _meta_init(cfg: ModelConfig, seed: int) -> Transformer:
    model = build_model(cfg)  # meta
    model.to_empty(device="cpu")
    with torch.no_grad():  # what uninitialized memory could hold: check_initialized must see it
        for t in [*model.parameters(), *model.buffers()]:
            t.fill_(float("nan"))
    torch.manual_seed(seed)
    model.init_weights()
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_meta_build_then_init_is_complete_and_deterministic(tie: bool) -> None:
    cfg = tiny(tie_embeddings=tie)
    a, b, c = _meta_init(cfg, 0), _meta_init(cfg, 0), _meta_init(cfg, 1)
    check_initialized(a)
    assert (a.output.weight is a.tok_embeddings.weight) == tie
    for key, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[key]), key
    torch.testing.assert_close(a.rope_cache, rope_table(cfg))
    assert not torch.equal(a.layers["0"].attention.wq.weight, c.layers["0"].attention.wq.weight)


def test_check_initialized_catches_nan_and_meta() -> None:
    model = built(tiny())
    with torch.no_grad():
        model.layers["1"].feed_forward.w2.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="layers.1.feed_forward.w2.weight"):
        check_initialized(model)
    with pytest.raises(RuntimeError, match="meta"):
        check_initialized(build_model(tiny()))


def test_init_of_a_weight_does_not_depend_on_other_modules() -> None:
    cfg = tiny(n_layers=3, tie_embeddings=True)
    whole = _meta_init(cfg, 5)
    stage = build_model(cfg)
    del stage.layers["0"], stage.layers["1"]
    stage.tok_embeddings = None  # a last pipeline stage keeps the tied output alone
    stage.to_empty(device="cpu")
    torch.manual_seed(5)
    stage.init_weights()
    check_initialized(stage)
    w1 = stage.layers["2"].feed_forward.w1.weight
    assert torch.equal(w1, whole.layers["2"].feed_forward.w1.weight)
    assert torch.equal(stage.output.weight, whole.tok_embeddings.weight)


def test_init_values_do_not_depend_on_parameter_dtype() -> None:
    cfg = tiny()
    fp32 = _meta_init(cfg, 3)
    bf16 = build_model(cfg).to_empty(device="cpu").to(torch.bfloat16)
    torch.manual_seed(3)
    bf16.init_weights()
    for key, tensor in fp32.state_dict().items():
        assert torch.equal(bf16.state_dict()[key], tensor.to(torch.bfloat16)), key


def test_init_standard_deviations() -> None:
    cfg = tiny(dim=256, n_heads=4, n_kv_heads=None, n_layers=2, vocab_size=512, multiple_of=256,
               init_std=0.02)
    model = built(cfg)
    block = model.layers["1"]
    assert block.attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attention.wo.weight.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.05)
    assert block.feed_forward.w2.weight.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.05)
    assert model.output.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert model.output.weight.abs().max().item() <= 3 * 256**-0.5
    flat = built(dataclasses.replace(cfg, depth_init=False)).layers["0"].attention.wo.weight
    assert flat.std().item() == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.05)


# ------------------------------------------------------------------------------- counts


@pytest.mark.parametrize("overrides", [
    {},
    {"n_kv_heads": None},
    {"tie_embeddings": True},
    {"ffn_dim_multiplier": 1.3, "multiple_of": 64, "n_layers": 3},
    {"ffn_hidden_dim": 100, "n_heads": 8, "n_kv_heads": 1},
])
def test_count_params_matches_the_built_model(overrides: dict[str, object]) -> None:
    cfg = tiny(**overrides)
    model = build_model(cfg)  # meta: numel without allocation
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    # named_parameters lists a tied matrix once, under tok_embeddings
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "tok_embeddings" not in n)
    assert count_params(cfg, exclude_embeddings=True) == non_embedding


@pytest.mark.parametrize("name, expected", [
    ("llama2_7b", 6_738_415_616),
    ("llama2_13b", 13_015_864_320),
    ("llama2_70b", 68_976_648_192),
    ("llama3_8b", 8_030_261_248),
])
def test_llama_preset_counts(name: str, expected: int) -> None:
    cfg = load_preset(name)
    assert cfg.name == name
    assert count_params(cfg) == expected


def test_small_presets_sizes_and_all_presets_valid() -> None:
    for path in CONF_MODEL.glob("*.yaml"):
        cfg = load_preset(path.stem)
        validate_model(cfg)
        assert cfg.name == path.stem
    assert 0.9e6 <= count_params(load_preset("debug")) <= 1.3e6
    assert 5e6 <= count_params(load_preset("cpu")) <= 20e6
    assert count_params(load_preset("bench15m")) == pytest.approx(15.7e6, rel=0.01)
    assert ffn_hidden_dim(load_preset("llama2_70b")) == 28672
    assert ffn_hidden_dim(load_preset("llama3_8b")) == 14336
    assert ffn_hidden_dim(load_preset("llama2_7b")) == 11008


@pytest.mark.parametrize("tie", [False, True])
def test_flops_per_token_by_hand(tie: bool) -> None:
    cfg = tiny(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, ffn_hidden_dim=128,
               tie_embeddings=tie)
    # per layer: wq 64*64 + wk 64*32 + wv 64*32 + wo 64*64 = 12288; ffn 3*64*128 = 24576
    n_matmul = 2 * (12288 + 24576) + 100 * 64  # + output projection, also when tied
    assert flops_per_token(cfg, 32) == 6 * n_matmul + 12 * 2 * 64 * 32 == 529_920
    linear = sum(m.weight.numel() for m in build_model(cfg).modules() if isinstance(m, nn.Linear))
    assert linear == n_matmul
