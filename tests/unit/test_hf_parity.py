"""Our model against transformers' LlamaForCausalLM: logits, conversions, export, tokenizer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from pretrain.config import ModelConfig  # noqa: E402
from pretrain.data.tokenizer import train_tokenizer  # noqa: E402
from pretrain.interop.hf import (  # noqa: E402
    export_hf,
    from_hf_config,
    from_hf_state_dict,
    import_hf,
    save_hf_tokenizer,
    to_hf_config,
    to_hf_state_dict,
)
from pretrain.models.llama import Transformer, build_model, count_params  # noqa: E402

BASE = dict(name="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=None, vocab_size=96,
            multiple_of=32, max_seq_len=128)
CONFIGS = {
    "mha": ModelConfig(**BASE),
    "gqa": ModelConfig(**{**BASE, "n_heads": 8, "n_kv_heads": 2}),
    "tied": ModelConfig(**{**BASE, "n_kv_heads": 2, "tie_embeddings": True}),
    # head_dim 16, theta 1e4, original length 32: wavelengths 6.3 (kept), 19.9 (interpolated),
    # 62.8 and up (divided by the factor) cover all three Llama-3.1 bands
    "rope_llama3": ModelConfig(**{**BASE, "rope_scaling_factor": 8.0,
                                  "rope_original_max_seq_len": 32}),
    "theta_5e5": ModelConfig(**{**BASE, "rope_theta": 5e5}),
    "ffn_multiplier": ModelConfig(**{**BASE, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-6}),
}


def randomized(cfg: ModelConfig) -> Transformer:
    """Weights far from init (norms too), so a wrong mapping or convention shows in the logits."""
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.08)
    return model


def hf_logits(hf_model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=x).logits


def tokens(cfg: ModelConfig, T: int = 100) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_llama_for_causal_lm(name: str) -> None:
    cfg = CONFIGS[name]
    ours = randomized(cfg)
    hf = transformers.AutoModelForCausalLM.from_config(to_hf_config(cfg),
                                                       attn_implementation="eager")
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    hf.eval()
    x = tokens(cfg)
    with torch.no_grad():
        diff = (ours(x) - hf_logits(hf, x)).abs().max().item()
    assert diff <= 1e-4


def test_explicit_positions_match_hf_position_ids() -> None:
    cfg = CONFIGS["gqa"]
    ours = randomized(cfg)
    hf = transformers.AutoModelForCausalLM.from_config(to_hf_config(cfg),
                                                       attn_implementation="eager")
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    x = tokens(cfg, T=12)
    positions = torch.tensor([[0, 1, 2, 3, 9, 10, 11, 30, 31, 32, 60, 61], list(range(5, 17))])
    with torch.no_grad():
        theirs = hf(input_ids=x, position_ids=positions).logits
        assert (ours(x, positions=positions) - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_returns_identical_tensors_and_config(name: str) -> None:
    cfg = CONFIGS[name]
    state = randomized(cfg).state_dict()
    hf_cfg = to_hf_config(cfg)
    back = from_hf_state_dict(to_hf_state_dict(state, cfg), hf_cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    again = from_hf_config(hf_cfg, name=cfg.name)
    assert count_params(again) == count_params(cfg)
    assert to_hf_config(again).to_dict() == hf_cfg.to_dict()
    unchanged = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps",
                 "rope_theta", "rope_scaling_factor", "max_seq_len", "tie_embeddings")
    assert all(getattr(again, f) == getattr(cfg, f) for f in unchanged)


def test_conversion_refuses_what_it_cannot_map() -> None:
    cfg = CONFIGS["gqa"]
    state = randomized(cfg).state_dict()
    with pytest.raises(ValueError, match="unexpected parameter"):
        to_hf_state_dict({**state, "layers.0.attention.wq.bias": torch.zeros(64)}, cfg)
    with pytest.raises(KeyError, match="lacks"):
        to_hf_state_dict({k: v for k, v in state.items() if "layers.1." not in k}, cfg)
    hf_cfg = to_hf_config(cfg)
    hf_cfg.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act"):
        from_hf_config(hf_cfg)


@pytest.mark.parametrize("name", ["gqa", "tied", "rope_llama3"])
def test_export_then_from_pretrained_gives_the_same_logits(name: str, tmp_path: Path) -> None:
    cfg = CONFIGS[name]
    ours = randomized(cfg)
    export_hf(ours.state_dict(), cfg, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    x = tokens(cfg, T=40)
    with torch.no_grad():
        assert (ours(x) - hf_logits(hf, x)).abs().max().item() <= 1e-4
    assert hf.generation_config.eos_token_id == 3
    state, imported = import_hf(tmp_path)
    assert state.keys() == ours.state_dict().keys()
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in state.items())
    assert dataclasses.replace(imported, name=cfg.name) == from_hf_config(to_hf_config(cfg),
                                                                         name=cfg.name)


def test_export_in_bf16(tmp_path: Path) -> None:
    cfg = CONFIGS["gqa"]
    ours = randomized(cfg)
    export_hf(ours.state_dict(), cfg, tmp_path, dtype=torch.bfloat16)
    state, _ = import_hf(tmp_path)
    assert state["layers.0.attention.wq.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(state["norm.weight"].float(), ours.norm.weight.detach(),
                               atol=1e-2, rtol=1e-2)


def test_import_refuses_a_hub_name() -> None:
    with pytest.raises(FileNotFoundError, match="hub"):
        import_hf("meta-llama/Llama-2-7b-hf")


# --------------------------------------------------------------------------------- tokenizer

TEXTS = [
    "Hello  world 😀 中文",
    " leading space",
    "  two leading, trailing  ",
    "\tindent\n  def f(x):\n    return x  # done\n",
    "import inspect.getsource()",
    "Ünïcödé naïve ÀÉ ﬁne ＡＢＣ ① …",
    " \n \n  a  b ",
    "",
]


# A few KB of code and prose with accents and odd spacing.
CORPUS = Path(__file__).read_text()[:5000] + "\nnaïve café  Ünïcödé\n"


def _train_spm(tmp: Path, options: dict[str, object] | None) -> spm.SentencePieceProcessor:
    """Ours (`train_tokenizer`) when options is None, else sentencepiece with `options`."""
    path = tmp / "sp.model"
    if options is None:
        train_tokenizer([CORPUS], str(path), vocab_size=640, character_coverage=1.0,
                        num_threads=1)
    else:
        (tmp / "corpus.txt").write_text(CORPUS)
        spm.SentencePieceTrainer.train(
            input=str(tmp / "corpus.txt"), model_prefix=str(tmp / "sp"), model_type="bpe",
            vocab_size=400, byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            character_coverage=1.0, minloglevel=2, **options,
        )
    return spm.SentencePieceProcessor(model_file=str(path))


@pytest.mark.parametrize("options", [
    None,  # pretrain's own: identity, no dummy prefix, "\n" as a user-defined symbol
    {"normalization_rule_name": "identity", "remove_extra_whitespaces": False},  # Llama's
    {},  # sentencepiece's defaults: NFKC, whitespace cleanup, dummy prefix
])
def test_exported_tokenizer_encodes_like_sentencepiece(options: dict | None,
                                                       tmp_path: Path) -> None:
    sp = _train_spm(tmp_path, options)
    cfg = CONFIGS["gqa"]
    out = export_hf(randomized(cfg).state_dict(), cfg, tmp_path / "hf",
                    tokenizer_path=str(tmp_path / "sp.model"))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert sum(sp.is_byte(i) for i in sp.encode(TEXTS[0])) > 0  # byte fallback is exercised
    for text in TEXTS:
        ids = sp.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert tok(text)["input_ids"] == [2, *ids], text
        assert tok.decode([2, *ids, 3], skip_special_tokens=True) == sp.decode(ids), text


def test_tokenizer_export_refuses_what_it_cannot_reproduce(tmp_path: Path) -> None:
    _train_spm(tmp_path, {"user_defined_symbols": ["<tab>"]})
    with pytest.raises(ValueError, match="user-defined"):
        save_hf_tokenizer(tmp_path / "sp.model", tmp_path, model_max_length=128)
