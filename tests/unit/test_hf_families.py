"""The encoder (BertForMaskedLM, ModernBertForMaskedLM) and encoder-decoder
(T5ForConditionalGeneration) families against transformers: logits after export and
`from_pretrained`, import back, refused configs, the exported tokenizer and the export command;
also the decoder options (biases, head_dim) that LlamaForCausalLM expresses, and the import of
RoBERTa and of a ModernBERT that transformers made."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from pretrain.config import ModelConfig  # noqa: E402
from pretrain.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from pretrain.interop.hf import (  # noqa: E402
    export_hf,
    from_hf_config,
    from_hf_state_dict,
    import_hf,
    to_hf_config,
    to_hf_state_dict,
)
from pretrain.models.build import build_model  # noqa: E402
from tools.export_hf import main as export_main  # noqa: E402

BERT = dict(arch="encoder", norm="layer", norm_position="post", norm_eps=1e-12, bias=True,
            mlp="gelu", position="learned", tie_embeddings=True, vocab_size=120, max_seq_len=64)
ENCODERS = {
    "bert": ModelConfig(name="bert", dim=64, n_layers=2, n_heads=4, ffn_hidden_dim=96, **BERT),
    "one_layer_2_heads": ModelConfig(name="bert1", dim=48, n_layers=1, n_heads=2,
                                     ffn_hidden_dim=80, type_vocab_size=3,
                                     **{**BERT, "norm_eps": 1e-5}),
    "3_layers_8_heads": ModelConfig(name="bert3", dim=64, n_layers=3, n_heads=8,
                                    ffn_hidden_dim=256, **BERT),
}
MODERN_BERT = dict(arch="encoder", norm="layer", norm_position="pre", norm_eps=1e-5, bias=False,
                   mlp="geglu", position="rope", tie_embeddings=True, vocab_size=120,
                   max_seq_len=64)
MODERN_BERTS = {
    "modernbert": ModelConfig(name="mbert", dim=64, n_layers=3, n_heads=4, ffn_hidden_dim=96,
                              rope_theta=160_000.0, **MODERN_BERT),
    # biases in every projection and LayerNorm (norm_bias, attention/mlp/classifier_bias)
    "modernbert_1_layer_biases": ModelConfig(name="mbert1", dim=48, n_layers=1, n_heads=2,
                                             ffn_hidden_dim=80, rope_theta=500.0,
                                             **{**MODERN_BERT, "bias": True}),
    "modernbert_2_layers_8_heads": ModelConfig(name="mbert2", dim=64, n_layers=2, n_heads=8,
                                               ffn_hidden_dim=128, rope_theta=10_000.0,
                                               **{**MODERN_BERT, "norm_eps": 1e-6}),
}
T5 = dict(arch="encoder_decoder", norm="rms", norm_eps=1e-6, position="relative",
          scale_attention=False, vocab_size=120, max_seq_len=64)
T5S = {
    # T5 v1.0: ReLU, tied (the decoder output scaled by dim**-0.5)
    "v1_0_tied_relu": ModelConfig(name="t5a", dim=64, n_layers=2, n_decoder_layers=2,
                                  n_heads=4, head_dim=16, ffn_hidden_dim=96, mlp="relu",
                                  tie_embeddings=True, **T5),
    # T5 v1.1: gated GELU, untied; heads x head_dim (24) != dim, more decoder than encoder blocks
    "v1_1_untied_gated": ModelConfig(name="t5b", dim=48, n_layers=1, n_decoder_layers=3,
                                     n_heads=3, head_dim=8, ffn_hidden_dim=64, mlp="gated_gelu",
                                     tie_embeddings=False, **T5),
    # few buckets and a short max distance: the inputs reach the logarithmic and the last bucket
    "untied_relu_8_buckets": ModelConfig(name="t5c", dim=32, n_layers=3, n_decoder_layers=1,
                                         n_heads=2, head_dim=16, ffn_hidden_dim=64, mlp="relu",
                                         tie_embeddings=False, relative_buckets=8,
                                         relative_max_distance=20, **T5),
    "tied_gated": ModelConfig(name="t5d", dim=32, n_layers=2, n_decoder_layers=2, n_heads=4,
                              head_dim=8, ffn_hidden_dim=48, mlp="gated_gelu",
                              tie_embeddings=True, **T5),
}
DECODER_OPTIONS = {
    "bias_head_dim": ModelConfig(name="dec", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                 head_dim=24, bias=True, ffn_hidden_dim=96, vocab_size=120,
                                 max_seq_len=64),
}


def randomized(cfg: ModelConfig) -> nn.Module:
    """Weights far from init (norms, biases and relative biases too), so that a wrong mapping
    or convention shows in the logits."""
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.5 if "relative_bias" in name else 0.08)
    return model.eval()


def ids(cfg: ModelConfig, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))


def max_diff(ours: nn.Module, hf: nn.Module, cfg: ModelConfig, *, padded: bool = False) -> float:
    """Largest logit difference on random inputs (the encoder's or T5's, 40 tokens; T5's
    decoder 30); `padded`: the second sequence's last 15 inputs are padding, masked in both
    models and left out of the comparison."""
    x = ids(cfg, 40)
    mask = torch.ones(2, 40, dtype=torch.bool)
    if padded:
        mask[1, 25:] = False
    ours_mask = mask[:, None, None, :] if padded else None
    with torch.no_grad():
        if cfg.arch == "encoder":
            a = ours(x, attn_mask=ours_mask)
            b = hf(input_ids=x, attention_mask=mask.long()).logits
            return (a - b)[mask].abs().max().item()
        y = ids(cfg, 30, seed=2)
        a = ours(x, decoder_inputs=y, attn_mask=ours_mask)
        b = hf(input_ids=x, attention_mask=mask.long(), decoder_input_ids=y).logits
        return (a - b).abs().max().item()


def assert_same_state(state: dict[str, torch.Tensor], model: nn.Module) -> None:
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], v) for k, v in expected.items())


ALL = {**ENCODERS, **MODERN_BERTS, **T5S, **DECODER_OPTIONS}


def hf_class_name(cfg: ModelConfig) -> str:
    if cfg.arch == "encoder":
        return "BertForMaskedLM" if cfg.norm_position == "post" else "ModernBertForMaskedLM"
    return {"decoder": "LlamaForCausalLM",
            "encoder_decoder": "T5ForConditionalGeneration"}[cfg.arch]


@pytest.mark.parametrize("name", list(ALL))
def test_export_then_from_pretrained_gives_the_same_logits(name: str, tmp_path: Path) -> None:
    cfg = ALL[name]
    ours = randomized(cfg)
    export_hf(ours.state_dict(), cfg, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == [hf_class_name(cfg)]
    hf_class = getattr(transformers, saved["architectures"][0])
    hf = hf_class.from_pretrained(tmp_path).eval()
    if cfg.arch == "decoder":
        with torch.no_grad():
            x = ids(cfg, 40)
            assert (ours(x) - hf(input_ids=x).logits).abs().max().item() <= 1e-4
    else:
        assert max_diff(ours, hf, cfg) <= 1e-4
        assert max_diff(ours, hf, cfg, padded=True) <= 1e-4
    state, imported = import_hf(tmp_path)
    assert_same_state(state, ours)
    assert imported == dataclasses.replace(cfg, name=imported.name)


@pytest.mark.parametrize("name", list(T5S))
def test_t5_export_says_how_to_generate_and_whether_it_is_tied(name: str,
                                                               tmp_path: Path) -> None:
    cfg = T5S[name]
    export_hf(randomized(cfg).state_dict(), cfg, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["tie_word_embeddings"] is cfg.tie_embeddings  # what transformers 4 reads
    assert saved["feed_forward_proj"] == {"relu": "relu", "gated_gelu": "gated-gelu"}[cfg.mlp]
    assert (saved["num_layers"], saved["num_decoder_layers"]) == (cfg.n_layers,
                                                                  cfg.n_decoder_layers)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert (generation["decoder_start_token_id"], generation["eos_token_id"],
            generation["pad_token_id"]) == (0, 3, 0)


def test_untied_t5_in_bf16_keeps_its_own_output_matrix(tmp_path: Path) -> None:
    cfg = T5S["v1_1_untied_gated"]
    ours = randomized(cfg)
    export_hf(ours.state_dict(), cfg, tmp_path, dtype=torch.bfloat16)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert hf.lm_head.weight.dtype == torch.bfloat16
    assert hf.lm_head.weight.data_ptr() != hf.shared.weight.data_ptr()
    state, _ = import_hf(tmp_path)
    torch.testing.assert_close(state["output.weight"].float(), ours.output.weight.detach(),
                               atol=1e-2, rtol=1e-2)
    assert not torch.equal(state["output.weight"], state["tok_embeddings.weight"])


@pytest.mark.parametrize("name", list(ENCODERS) + list(MODERN_BERTS) + list(T5S))
def test_conversion_round_trip_and_strict_load(name: str) -> None:
    cfg = ALL[name]
    ours = randomized(cfg)
    hf_cfg = to_hf_config(cfg)
    hf_state = to_hf_state_dict(ours.state_dict(), cfg)
    hf = transformers.AutoModelForMaskedLM if cfg.arch == "encoder" else \
        transformers.AutoModelForSeq2SeqLM
    hf.from_config(hf_cfg).load_state_dict(hf_state, strict=True)  # every HF name, no other
    assert_same_state(from_hf_state_dict(hf_state, hf_cfg), ours)
    assert from_hf_config(hf_cfg, name=cfg.name) == cfg


def test_modern_bert_export_is_all_global_attention_and_reads_as_older_versions_write_it(
        tmp_path: Path) -> None:
    """Every layer global attention with our rotary base, logits at every position, pretrain's
    token ids; the keys transformers 4 reads (`global_attn_every_n_layers`, `*_rope_theta`)
    alone give the same model."""
    cfg = MODERN_BERTS["modernbert"]
    export_hf(randomized(cfg).state_dict(), cfg, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["layer_types"] == ["full_attention"] * cfg.n_layers
    assert {k: v["rope_theta"] for k, v in saved["rope_parameters"].items()} == {
        "full_attention": cfg.rope_theta, "sliding_attention": cfg.rope_theta}
    assert (saved["global_attn_every_n_layers"], saved["global_rope_theta"],
            saved["local_rope_theta"]) == (1, cfg.rope_theta, cfg.rope_theta)
    assert not saved["sparse_prediction"] and saved["decoder_bias"] and not saved["norm_bias"]
    assert [saved[f"{k}_token_id"] for k in ("pad", "bos", "eos", "cls", "sep", "mask")] == [
        0, 2, 3, 2, 3, 4]
    older = {k: v for k, v in saved.items() if k not in ("layer_types", "rope_parameters")}
    (tmp_path / "config.json").write_text(json.dumps(older))
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert from_hf_config(hf_cfg, name=cfg.name) == cfg


def test_modern_bert_made_by_transformers_imports(tmp_path: Path) -> None:
    """A ModernBertForMaskedLM that transformers built (from the config keys older versions
    use) and saved (the tied output matrix stored once): same logits, padding masked too."""
    hf_cfg = transformers.ModernBertConfig(
        vocab_size=100, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64, global_attn_every_n_layers=1,
        global_rope_theta=1000.0, pad_token_id=0, eos_token_id=3, bos_token_id=2,
        cls_token_id=2, sep_token_id=3)
    torch.manual_seed(0)
    hf = transformers.ModernBertForMaskedLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.08)
    hf.save_pretrained(tmp_path)
    state, cfg = import_hf(tmp_path)
    assert (cfg.norm_position, cfg.mlp, cfg.position, cfg.rope_theta, cfg.bias) == (
        "pre", "geglu", "rope", 1000.0, False)
    ours = build_model(cfg, device="cpu").eval()
    ours.load_state_dict(state, strict=True)
    assert max_diff(ours, hf, cfg) <= 1e-4
    assert max_diff(ours, hf, cfg, padded=True) <= 1e-4


@pytest.mark.parametrize(("changes", "message"), [
    (dict(global_attn_every_n_layers=3), r"local \(sliding-window\) attention in layers \[1, 2\]"),
    (dict(norm_bias=True), "norm_bias=True with attention_bias=False"),
    (dict(attention_bias=True, mlp_bias=True), "classifier_bias=False with attention_bias=True"),
    (dict(hidden_activation="silu"), "hidden_activation='silu'"),
    (dict(decoder_bias=False), "decoder_bias=False"),
])
def test_modern_bert_import_refuses_what_our_encoder_lacks(changes: dict,
                                                           message: str) -> None:
    kwargs = dict(vocab_size=100, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                  num_attention_heads=2, global_attn_every_n_layers=1)
    hf_cfg = transformers.ModernBertConfig(**{**kwargs, **changes})
    with pytest.raises(ValueError, match=f"unsupported ModernBERT variant .*{message}"):
        from_hf_config(hf_cfg)


@pytest.mark.parametrize(("changes", "field"), [
    (dict(position="learned"), "position='learned'"),
    (dict(mlp="gelu"), "mlp='gelu'"),
    (dict(norm="rms"), "norm='rms'"),
    (dict(n_kv_heads=2), "n_kv_heads=2"),
    (dict(head_dim=32), "head_dim=32"),
    (dict(rope_scaling_factor=8.0), "rope_scaling_factor=8.0"),
    (dict(tie_embeddings=False), "tie_embeddings=False"),
])
def test_pre_norm_encoder_export_names_what_modern_bert_cannot_express(
        changes: dict, field: str, tmp_path: Path) -> None:
    """Neither encoder recipe: the fields that differ from BERT's and from ModernBERT's."""
    cfg = dataclasses.replace(MODERN_BERTS["modernbert"], **changes)
    with pytest.raises(ValueError, match=f"as BertForMaskedLM: .*model.norm_position='pre'.* "
                                         f"nor as ModernBertForMaskedLM: .*model.{field}"):
        export_hf({}, cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("cfg", "field"), [
    (dataclasses.replace(ENCODERS["bert"], norm="rms"), "norm='rms'"),
    (dataclasses.replace(ENCODERS["bert"], position="rope"), "position='rope'"),
    (dataclasses.replace(ENCODERS["bert"], norm_position="pre"), "norm_position='pre'"),
    (dataclasses.replace(ENCODERS["bert"], mlp="swiglu"), "mlp='swiglu'"),
    (dataclasses.replace(ENCODERS["bert"], n_kv_heads=2), "n_kv_heads=2"),
    (dataclasses.replace(T5S["v1_0_tied_relu"], bias=True), "bias=True"),
    (dataclasses.replace(T5S["v1_0_tied_relu"], mlp="swiglu"), "mlp='swiglu'"),
    (dataclasses.replace(T5S["v1_0_tied_relu"], scale_attention=True), "scale_attention=True"),
    (dataclasses.replace(DECODER_OPTIONS["bias_head_dim"], norm="layer"), "norm='layer'"),
])
def test_export_refuses_what_the_hf_class_cannot_express(cfg: ModelConfig, field: str,
                                                         tmp_path: Path) -> None:
    state = {}  # refused before the weights are looked at
    with pytest.raises(ValueError, match=f"cannot be exported as .*model.{field}"):
        export_hf(state, cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_checkpoint_without_the_head(tmp_path: Path) -> None:
    cfg = ENCODERS["bert"]
    export_hf(randomized(cfg).state_dict(), cfg, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="BertModel"):
        import_hf(tmp_path)


def test_roberta_import_drops_the_position_offset(tmp_path: Path) -> None:
    hf_cfg = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64,
                                        max_position_embeddings=66, type_vocab_size=1,
                                        pad_token_id=1)
    torch.manual_seed(0)
    hf = transformers.RobertaForMaskedLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.08)
    hf.save_pretrained(tmp_path)
    state, cfg = import_hf(tmp_path)
    assert (cfg.arch, cfg.max_seq_len, cfg.type_vocab_size) == ("encoder", 64, 1)
    ours = build_model(cfg, device="cpu").eval()
    ours.load_state_dict(state, strict=True)
    x = torch.randint(2, 100, (2, 64), generator=torch.Generator().manual_seed(1))  # no pad
    with torch.no_grad():
        assert (ours(x) - hf(input_ids=x).logits).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------------- tokenizer

TEXTS = ["Hello  world 😀 中文", " leading space", "\tdef f(x):\n    return x  # done\n",
         "naïve café", ""]
CORPUS = Path(__file__).read_text()[:6000] + "\nnaïve café  Ünïcödé 中文\n"


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tok") / "sp.model"
    return train_tokenizer([CORPUS], str(path), vocab_size=640, character_coverage=1.0,
                           num_threads=1)


def piece_id(spm_path: str, piece: str) -> int | None:
    """The id of `piece` in the SentencePiece model, None if it has no such piece."""
    sp = spm.SentencePieceProcessor(model_file=spm_path)
    i = sp.piece_to_id(piece)
    return i if sp.id_to_piece(i) == piece else None


@pytest.mark.parametrize("arch", ["encoder", "encoder_decoder"])
def test_exported_tokenizer_encodes_like_ours(arch: str, spm_path: str, tmp_path: Path) -> None:
    cfg = ENCODERS["bert"] if arch == "encoder" else T5S["v1_1_untied_gated"]
    ours = Tokenizer.load(spm_path)
    cfg = dataclasses.replace(cfg, vocab_size=ours.vocab_size)
    export_hf(randomized(cfg).state_dict(), cfg, tmp_path, tokenizer_path=spm_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tok.model_max_length == cfg.max_seq_len
    for text in TEXTS:
        encoded = ours.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == encoded, text
        assert tok(text)["input_ids"] == [*encoded, 3], text  # EOS after, no BOS (as T5's)
        assert tok.decode([*encoded, 3], skip_special_tokens=True) == ours.decode(encoded), text
    pair = tok("a b", "c")
    assert pair["input_ids"] == [*ours.encode("a b"), 3, *ours.encode("c"), 3]
    assert ("token_type_ids" in pair) == (arch == "encoder")
    # The objectives' control pieces, in tokenizers that have them (pretrain's own do).
    mask, sentinel = piece_id(spm_path, "<mask>"), piece_id(spm_path, "<extra_id_0>")
    if arch == "encoder" and mask is not None:
        assert (tok.mask_token, tok.mask_token_id) == ("<mask>", mask)
        # the mask takes the space before it, as the masked token "▁y" began with it
        assert tok("x <mask> y", add_special_tokens=False)["input_ids"] == [
            *ours.encode("x"), mask, *ours.encode(" y")]
    if arch == "encoder_decoder" and sentinel is not None:
        sentinels = [f"<extra_id_{i}>" for i in range(100)]
        extra = getattr(tok, "extra_special_tokens", None) or tok.additional_special_tokens
        assert [str(t) for t in extra][:100] == sentinels
        assert tok.convert_tokens_to_ids(sentinels) == [piece_id(spm_path, s) for s in sentinels]
        text = "x <extra_id_0> y <extra_id_1>"
        assert tok(text)["input_ids"] == [*ours.encode("x"), sentinel, *ours.encode(" y"),
                                          piece_id(spm_path, "<extra_id_1>"), 3]
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == "x y"


# ------------------------------------------------------------------------------ export tool


CONF_MODEL = Path(__file__).parents[2] / "conf" / "model"


def verified_figure(out: str) -> str:
    """The largest logit difference `pretrain-export-hf` printed when it checked itself."""
    found = re.search(r"verified: transformers' logits match ours to (\S+) ", out)
    assert found, out
    return found[1]


@pytest.mark.parametrize("name", ["bert", "cpu_encoder", "v1_1_untied_gated"])
def test_export_command_writes_a_loadable_model(name: str, spm_path: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """`pretrain-export-hf` on a consolidated checkpoint (what `pretrain-consolidate` writes):
    the class comes from the config saved with the run (cpu_encoder: the preset's ModernBERT
    recipe and size)."""
    cfg = ModelConfig(**yaml.safe_load((CONF_MODEL / f"{name}.yaml").read_text())) \
        if name == "cpu_encoder" else ALL[name]
    cfg = dataclasses.replace(cfg, vocab_size=Tokenizer.load(spm_path).vocab_size)
    ours = randomized(cfg)
    state = {"config": {"model": dataclasses.asdict(cfg)}, "counters": {"step": 7},
             "tokenizer_path": spm_path}
    torch.save({"model": ours.state_dict(), "state": state}, tmp_path / "model.pt")
    assert export_main([str(tmp_path / "model.pt"), str(tmp_path / "hf")]) == 0
    # the command checked itself (the figure it prints) before it reported success
    assert float(verified_figure(capsys.readouterr().out)) <= 1e-4
    hf_class = transformers.AutoModelForMaskedLM if cfg.arch == "encoder" else \
        transformers.AutoModelForSeq2SeqLM
    hf = hf_class.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == hf_class_name(cfg)
    assert max_diff(ours, hf, cfg) <= 1e-4
    assert max_diff(ours, hf, cfg, padded=True) <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token_id == 3
    if cfg.arch == "encoder":
        assert tok.mask_token_id == piece_id(spm_path, "<mask>")
        # BERT takes token types, ModernBERT does not
        assert ("token_type_ids" in tok("a", "b")) == (cfg.norm_position == "post")
    if name == "cpu_encoder":
        assert hf.config.mask_token_id == tok.mask_token_id


def test_export_command_reports_a_config_it_cannot_export(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    cfg = dataclasses.replace(ENCODERS["bert"], norm="rms")
    state = {"config": {"model": dataclasses.asdict(cfg)}, "counters": {"step": 1}}
    torch.save({"model": {}, "state": state}, tmp_path / "model.pt")
    assert export_main([str(tmp_path / "model.pt"), str(tmp_path / "hf")]) == 2
    assert "model.norm='rms'" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
