"""The encoder and encoder-decoder families: presets against the published parameter counts,
the combinations validation refuses, and the decoder's guarantees (layout-independent
initialization, activation checkpointing, compile) holding for them too."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from pretrain.config import ModelConfig, ObjectiveConfig, ParallelConfig, TrainConfig
from pretrain.errors import ConfigError
from pretrain.models.build import build_model, count_params, flops_per_token
from pretrain.models.t5 import relative_buckets
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.parallelize import init_model_weights, parallelize
from pretrain.validate import validate

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


def preset(name: str) -> ModelConfig:
    return ModelConfig(**yaml.safe_load((CONF / f"{name}.yaml").read_text()))


# The published sizes: the BERT paper's 110M / 340M, and the hub checkpoints of T5 (counted
# by transformers from the released weights: bert-base-uncased's BertForMaskedLM, t5-base,
# google/t5-v1_1-base, google/t5-v1_1-large).
PUBLISHED = {
    "bert_base": (109_514_298, 110e6),
    "bert_large": (335_174_458, 340e6),
    "t5_base": (222_903_552, 220e6),
    "t5_v1_1_base": (247_577_856, 248e6),
    "t5_v1_1_large": (783_150_080, 783e6),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_the_published_parameter_counts(name: str) -> None:
    exact, headline = PUBLISHED[name]
    assert count_params(preset(name)) == exact
    assert abs(exact - headline) / headline < 0.02


def test_bert_count_equals_transformers() -> None:
    from transformers import BertConfig, BertForMaskedLM

    with torch.device("meta"):
        hf = BertForMaskedLM(BertConfig(hidden_size=1024, num_hidden_layers=24,
                                        num_attention_heads=16, intermediate_size=4096))
    assert count_params(preset("bert_large")) == hf.num_parameters()


def test_t5_count_equals_transformers() -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    with torch.device("meta"):
        hf = T5ForConditionalGeneration(T5Config(vocab_size=32128, d_model=768, d_kv=64,
                                                 d_ff=3072, num_layers=12, num_heads=12))
    assert count_params(preset("t5_base")) == hf.num_parameters()


def test_flops_count_every_family() -> None:
    for name in ("cpu", "cpu_encoder", "cpu_t5"):
        cfg = preset(name)
        assert flops_per_token(cfg, 256) > 6 * count_params(cfg, exclude_embeddings=True)
    t5 = preset("cpu_t5")
    # Fewer decoder tokens per input token, fewer FLOPs per input token.
    assert flops_per_token(t5, 256, decoder_len=64) < flops_per_token(t5, 256)


def _cfg(model: str, objective: str) -> TrainConfig:
    cfg = TrainConfig(model=preset(model), objective=ObjectiveConfig(name=objective))
    cfg.seq_len = 128
    return cfg


@pytest.mark.parametrize(("model", "objective", "message"), [
    ("cpu", "mlm", "objective=mlm trains a model.arch=encoder.*model=cpu_encoder"),
    ("cpu_encoder", "fim", "objective=fim trains a model.arch=decoder"),
    ("cpu_encoder", "clm", "objective=clm trains a model.arch=decoder"),
    ("cpu_t5", "mlm", "objective=mlm trains a model.arch=encoder"),
    ("cpu", "span", "model=cpu_t5"),
])
def test_objective_and_family_must_match(model: str, objective: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(_cfg(model, objective), world_size=1)


def test_valid_combinations_pass() -> None:
    for model, objective in (("cpu", "clm"), ("cpu", "fim"), ("cpu_encoder", "mlm"),
                             ("cpu_t5", "span")):
        validate(_cfg(model, objective), world_size=1)


@pytest.mark.parametrize("change,message", [
    (lambda c: setattr(c.parallel, "tp", 2), "tensor and pipeline parallelism are implemented "
                                             "for the decoder only"),
    (lambda c: setattr(c.data, "document_masking", True), "document_masking"),
    (lambda c: setattr(c.objective, "mask_rate", 1.5), "objective.mask_rate"),
    (lambda c: setattr(c.model, "tie_embeddings", False), "tie_embeddings=true"),
    (lambda c: setattr(c.model, "norm", "batch"), "model.norm='batch'"),
])
def test_encoder_refusals(change, message: str) -> None:
    cfg = _cfg("cpu_encoder", "mlm")
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=1 if cfg.parallel.tp == 1 else 2)


def test_too_many_spans_for_the_sentinels() -> None:
    cfg = _cfg("cpu_t5", "span")
    cfg.seq_len = 1024
    cfg.objective.mean_span_length = 1.0
    with pytest.raises(ConfigError, match="100 sentinels"):
        validate(cfg, world_size=1)


def test_relative_buckets_follow_t5() -> None:
    """Exact buckets for small distances, a shared last bucket far away, and direction."""
    rel = torch.arange(-200, 201)
    both = relative_buckets(rel, bidirectional=True, n_buckets=32, max_distance=128)
    assert both[200].item() == 0 and both[201].item() == 17 and both[199].item() == 1
    assert both[0].item() == 15 and both[-1].item() == 31  # beyond max_distance
    back = relative_buckets(rel, bidirectional=False, n_buckets=32, max_distance=128)
    assert (back[200:] == 0).all()  # the decoder never sees keys after the query
    assert back[200 - 5].item() == 5 and back[0].item() == 31
    assert (both.diff()[:200] <= 0).all() and (both.diff()[201:] >= 0).all()


def _tiny(name: str) -> ModelConfig:
    return dataclasses.replace(preset(name), dim=64, n_layers=2, n_heads=4, vocab_size=512,
                               ffn_hidden_dim=128, max_seq_len=64,
                               **({"head_dim": 16, "n_decoder_layers": 3}
                                  if name == "cpu_t5" else {}))


def _batch(cfg: ModelConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, cfg.vocab_size, (2, 16), generator=g)
    if cfg.arch == "encoder_decoder":
        dec = torch.randint(4, cfg.vocab_size, (2, 6), generator=g)
        return tokens, {"decoder_inputs": dec, "targets": dec}
    targets = torch.full_like(tokens, -100)
    targets[:, ::3] = tokens[:, ::3]
    return tokens, {"targets": targets}


@pytest.mark.parametrize("name", ["cpu_encoder", "cpu_t5"])
def test_init_does_not_depend_on_the_build(name: str) -> None:
    """`init_model_weights` (what every layout runs, block by block) gives the weights of a
    plain `init_weights` of the whole model with the same seed."""
    cfg = _tiny(name)
    from pretrain.parallel.parallelize import base_seed

    whole = build_model(cfg, device="meta")
    whole.to_empty(device="cpu")
    whole.init_weights(seed=base_seed(7))
    part = build_model(cfg, device="meta")
    init_model_weights(part, cfg, 7, torch.device("cpu"))
    for (n, a), (_, b) in zip(whole.state_dict().items(), part.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name", ["cpu_encoder", "cpu_t5"])
@pytest.mark.parametrize("mode", ["full", "selective", "compile"])
def test_checkpointing_and_compile_keep_the_numbers(name: str, mode: str) -> None:
    cfg = _tiny(name)
    dims = ParallelDims(1, 1, 1, 1, 1)

    def run(ac: str, compile: bool) -> tuple[float, list[torch.Tensor]]:
        model = build_model(cfg, device="meta")
        parallelize(model, dims, None, ac_mode=ac, compile=compile, parallel=ParallelConfig())
        init_model_weights(model, cfg, 3, torch.device("cpu"))
        tokens, kwargs = _batch(cfg)
        loss = model(tokens, **kwargs)
        loss.backward()
        return loss.item(), [p.grad for p in model.parameters()]

    ref_loss, ref_grads = run("none", False)
    loss, grads = run("none", True) if mode == "compile" else run(mode, False)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for a, b in zip(ref_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
