"""LoRA's pieces on their own: the adapter linear and its merge, applying it to a model (names,
freezing, initialization by name), the optimizer's groups, the config checks (one line each),
the base check and peft's names."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.config import LoraConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from pretrain.errors import CheckpointError, ConfigError
from pretrain.interop.peft import hf_target_modules, peft_key
from pretrain.models.build import build_model
from pretrain.models.lora import LoraLinear, apply_lora, lora_init_, merge_lora
from pretrain.parallel.parallelize import init_model_weights
from pretrain.train.adapters import BASE_KEY, base_record, check_base
from pretrain.train.checkpoint import write_integrity
from pretrain.train.compat import check_resume
from pretrain.train.optim import build_optimizer
from pretrain.validate import validate

TINY = ModelConfig(name="tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                   multiple_of=32, max_seq_len=32)
ALL = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def _adapted(targets: list[str] = ALL, seed: int = 3) -> nn.Module:
    model = apply_lora(build_model(TINY, device="meta"), rank=4, alpha=8.0, dropout=0.0,
                       targets=targets)
    init_model_weights([model], TINY, seed, torch.device("cpu"))
    return model


def test_lora_linear_is_base_plus_scaled_low_rank_update() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=True)
    layer = LoraLinear(base, rank=2, alpha=3.0, dropout=0.0)
    nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(4, 6)
    want = base(x) + (x @ layer.lora_a.weight.T @ layer.lora_b.weight.T) * 1.5
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-6)
    assert layer.weight is base.weight and layer.bias is base.bias


def test_apply_keeps_base_names_freezes_the_base_and_starts_as_the_base() -> None:
    plain = build_model(TINY, device="meta")
    init_model_weights([plain], TINY, 3, torch.device("cpu"))
    model = _adapted()
    names = dict(model.named_parameters())
    assert set(plain.state_dict()) <= set(names)
    adapters = {k for k in names if ".lora_" in k}
    assert "layers.0.attention.wq.lora_a.weight" in adapters
    assert names["layers.1.feed_forward.w2.lora_b.weight"].shape == (TINY.dim, 4)
    assert len(adapters) == 2 * 7 * TINY.n_layers
    assert {k for k, p in names.items() if p.requires_grad} == adapters
    for k, v in plain.state_dict().items():  # the base init is unchanged by the adapters
        assert torch.equal(v, model.state_dict()[k]), k
    x = torch.randint(0, TINY.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))  # B = 0


def test_adapter_init_is_peft_s_and_depends_on_seed_and_name_only() -> None:
    a = torch.empty(4, 32)
    lora_init_("layers.0.attention.wq.lora_a.weight", a, seed=7)
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert float(a.abs().max()) <= bound and float(a.abs().max()) > 0.8 * bound
    again = torch.empty(4, 32)
    lora_init_("layers.0.attention.wq.lora_a.weight", again, seed=7)
    other = torch.empty(4, 32)
    lora_init_("layers.1.attention.wq.lora_a.weight", other, seed=7)
    assert torch.equal(a, again) and not torch.equal(a, other)
    b = torch.ones(32, 4)
    lora_init_("layers.0.attention.wq.lora_b.weight", b, seed=7)
    assert float(b.abs().max()) == 0.0


def test_merge_gives_the_same_function_as_plain_linears() -> None:
    model = _adapted(["wq", "w2"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_b." in n:
                p.normal_(0, 0.1)
    x = torch.randint(0, TINY.vocab_size, (2, 8))
    with torch.no_grad():
        want = model(x)
        merged = merge_lora(model)
        assert not any(isinstance(m, LoraLinear) for m in merged.modules())
        assert not any(".lora_" in k for k in merged.state_dict())
        torch.testing.assert_close(merged(x), want, rtol=0, atol=1e-5)


def test_optimizer_holds_adapters_only() -> None:
    model = _adapted(["wq", "wv"])
    opt = build_optimizer(model, OptimConfig(implementation="foreach"), torch.device("cpu"))
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    assert held == trainable and all(g["params"] for g in opt.param_groups)


def test_unknown_target_is_an_error() -> None:
    with pytest.raises(ValueError, match="no linear layer"):
        apply_lora(build_model(TINY, device="meta"), rank=2, alpha=1.0, dropout=0.0,
                   targets=["attn"])


def _cfg(**changes: object) -> TrainConfig:
    lora = LoraConfig(rank=4)
    cfg = TrainConfig(model=TINY, lora=lora, seq_len=16, global_batch_size=4,
                      micro_batch_size=4)
    for key, value in changes.items():
        owner, _, field = key.rpartition("__")
        target = getattr(cfg, owner) if owner else cfg
        setattr(target, field, value)
    return cfg


@pytest.mark.parametrize(("changes", "message"), [
    ({"lora__targets": ["wq", "q_proj"]}, "lora.targets has ['q_proj']; use any of wq"),
    ({"lora__rank": -1}, "lora.rank=-1; use 0 (off)"),
    ({"lora__dropout": 1.0}, "lora.dropout=1.0 must be in [0, 1)"),
    ({"parallel": ParallelConfig(tp=2)}, "lora.rank > 0 runs on one process, DDP, FSDP"),
    ({"quant__qat": "int8_dynamic_act_int4_weight"}, "does not combine with precision=fp8 or"),
    ({"lora__dropout": 0.1, "activation_checkpointing": "full"},
     "the recomputation would draw other dropout masks"),
])
def test_config_refusals_are_one_line(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(_cfg(**changes), world_size=2 if "parallel" in changes else 1)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_lora_off_ignores_its_fields_and_a_good_config_passes() -> None:
    validate(_cfg())
    validate(_cfg(lora__rank=0, lora__targets=["nope"]))


def test_encoder_is_refused() -> None:
    model = dataclasses.replace(TINY, arch="encoder", position="learned", tie_embeddings=True)
    cfg = _cfg(model=model)
    cfg.objective.name = "mlm"
    with pytest.raises(ConfigError, match="built for model.arch=decoder"):
        validate(cfg)


def test_base_check_refuses_another_or_missing_base(tmp_path: Path) -> None:
    saved = {BASE_KEY: base_record(None, TINY, seed=1)}
    check_base(tmp_path, saved, None, TINY, 1)  # the same random base
    with pytest.raises(CheckpointError, match=r"random initialization with seed=1 .*set seed=1"):
        check_base(tmp_path, saved, None, TINY, 2)
    with pytest.raises(CheckpointError, match="names no base"):
        check_base(tmp_path, {}, None, TINY, 1)
    gone = str(tmp_path / "gone")
    with pytest.raises(CheckpointError, match="cannot be read now") as e:
        check_base(tmp_path, saved, gone, TINY, 1)
    assert "\n" not in str(e.value)


def test_peft_names() -> None:
    assert peft_key("layers.3.attention.wk.lora_b.weight", TINY) == (
        "base_model.model.model.layers.3.self_attn.k_proj.lora_B.weight")
    assert peft_key("layers.0.feed_forward.w1.lora_a.weight", TINY) == (
        "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight")
    assert hf_target_modules(ALL, TINY) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                            "down_proj", "up_proj"]
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        peft_key("layers.0.attention.wq.weight", TINY)


def test_resume_with_another_lora_shape_or_base_is_refused(tmp_path: Path) -> None:
    ck = tmp_path / "checkpoints" / "step_00000001"
    ck.mkdir(parents=True)
    cfg = _cfg()
    state = {"config": dataclasses.asdict(cfg), BASE_KEY: base_record(None, cfg.model, cfg.seed)}
    (ck / "trainer_state.json").write_text(json.dumps(state))
    write_integrity(ck)
    check_resume(cfg, tmp_path)  # the same LoRA and base: it resumes
    with pytest.raises(ConfigError, match="lora.rank is 8 but checkpoint .* written with 4"):
        check_resume(_cfg(lora__rank=8), tmp_path)
    with pytest.raises(ConfigError, match=r"lora.targets is \[wq,wk\]"):
        check_resume(_cfg(lora__targets=["wq", "wk"]), tmp_path)
    with pytest.raises(CheckpointError, match="seed=1234 .*not for the random initialization "
                                              "with seed=5"):
        check_resume(_cfg(seed=5), tmp_path)
