"""Generation from the encoder-decoder (cache vs recomputation, transformers' T5), FIM infills
from the decoder, mask filling from the encoder, and `pretrain-generate` on each family."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from torch import nn

from pretrain.config import ModelConfig
from pretrain.data.objectives import Fim, SpecialIds
from pretrain.data.tokenizer import SENTINELS, FimIds, Tokenizer, train_tokenizer
from pretrain.eval.generate import (
    decode_with_specials,
    encode_with_specials,
    fill_mask_text,
    fill_masks,
    fim_prompt,
    generate,
    generate_seq2seq,
    infill,
    infill_exact_match,
)
from pretrain.models.build import build_model
from pretrain.train import checkpoint as ckpt
from tools.generate import main as generate_main

VOCAB = 64
SOURCES = [[5, 9, 17, 22, 41, 3], [7, 8, 3], [30, 12, 50, 3]]
FIM = FimIds(prefix=60, middle=61, suffix=62, pad=63)


def t5_config(vocab_size: int = VOCAB) -> ModelConfig:
    return ModelConfig(name="tiny_t5", arch="encoder_decoder", dim=32, n_layers=2,
                       n_decoder_layers=2, n_heads=4, head_dim=8, vocab_size=vocab_size,
                       ffn_hidden_dim=48, norm_eps=1e-6, mlp="gated_gelu", position="relative",
                       scale_attention=False, relative_buckets=8, relative_max_distance=16,
                       max_seq_len=64, tie_embeddings=True, init_std=0.5)


def encoder_config(vocab_size: int = VOCAB) -> ModelConfig:
    return ModelConfig(name="tiny_bert", arch="encoder", dim=32, n_layers=2, n_heads=4,
                       vocab_size=vocab_size, ffn_hidden_dim=64, norm="layer",
                       norm_position="post", norm_eps=1e-12, bias=True, mlp="gelu",
                       position="learned", max_seq_len=64, tie_embeddings=True, init_std=0.2)


def decoder_config(vocab_size: int = VOCAB) -> ModelConfig:
    return ModelConfig(name="tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       vocab_size=vocab_size, multiple_of=16, max_seq_len=48)


def _build(cfg: ModelConfig) -> nn.Module:
    torch.manual_seed(0)
    return build_model(cfg, device="cpu").eval()


@pytest.fixture(scope="module")
def t5() -> nn.Module:
    return _build(t5_config())


@pytest.fixture(scope="module")
def encoder() -> nn.Module:
    return _build(encoder_config())


@pytest.fixture(scope="module")
def decoder() -> nn.Module:
    return _build(decoder_config())


# -- encoder-decoder -------------------------------------------------------------------------


def test_seq2seq_cache_equals_recomputing_the_decoder(t5: nn.Module) -> None:
    cached = generate_seq2seq(t5, SOURCES, max_new_tokens=20, temperature=0, eos_id=None)
    recomputed = generate_seq2seq(t5, SOURCES, max_new_tokens=20, temperature=0, eos_id=None,
                                  use_cache=False)
    assert cached == recomputed
    assert [len(row) for row in cached] == [20, 20, 20]
    assert len(set(cached[0])) > 2  # a model that repeats one token would prove little
    # padded rows decode as they do alone: the padding is masked out of the encoder and the
    # cross-attention
    for src, row in zip(SOURCES, cached):
        assert generate_seq2seq(t5, [src], max_new_tokens=20, temperature=0,
                                eos_id=None) == [row]


def test_seq2seq_sampling_given_a_seed_and_tensor_input(t5: nn.Module) -> None:
    src = torch.tensor(SOURCES[0])
    runs = [generate_seq2seq(t5, src, max_new_tokens=12, temperature=0.9, top_k=20,
                             use_cache=c, eos_id=None,
                             generator=torch.Generator().manual_seed(1)) for c in (True, False)]
    assert runs[0] == runs[1] and len(runs[0]) == 1


def test_seq2seq_stops_each_sequence_at_its_eos(t5: nn.Module) -> None:
    greedy = generate_seq2seq(t5, SOURCES, max_new_tokens=20, temperature=0, eos_id=None)
    eos = greedy[0][4]
    stopped = generate_seq2seq(t5, SOURCES, max_new_tokens=20, temperature=0, eos_id=eos)
    for full, row in zip(greedy, stopped):
        assert row == (full[: full.index(eos)] if eos in full else full)
    assert stopped[0] == greedy[0][: greedy[0].index(eos)]


def _to_hf_t5(model: nn.Module) -> nn.Module:
    """transformers' T5ForConditionalGeneration with `model`'s weights (T5 v1.1 MLP, tied and
    scaled output) mapped here by name, independent of pretrain.interop."""
    transformers = pytest.importorskip("transformers")
    cfg = model.config
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.head_dim, d_ff=cfg.ffn_hidden_dim,
        num_layers=cfg.n_layers, num_decoder_layers=cfg.n_decoder_layers, num_heads=cfg.n_heads,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance, dropout_rate=0.0,
        layer_norm_epsilon=cfg.norm_eps, feed_forward_proj="gated-gelu",
        tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=3))
    ours = model.state_dict()
    sd = {"shared.weight": ours["tok_embeddings.weight"], "lm_head.weight": ours["output.weight"],
          "encoder.final_layer_norm.weight": ours["norm.weight"],
          "decoder.final_layer_norm.weight": ours["decoder_norm.weight"]}
    for hstack, bias in (("encoder", "relative_bias"), ("decoder", "decoder_relative_bias")):
        key = f"{hstack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        sd[key] = ours[f"{bias}.weight"]
    for stack, hstack in (("layers", "encoder"), ("decoder_layers", "decoder")):
        for i in range(len(getattr(model, stack))):
            ours_, hf_ = f"{stack}.{i}.", f"{hstack}.block.{i}.layer."
            ff = 2 if hstack == "decoder" else 1
            for a, b in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o")):
                sd[f"{hf_}0.SelfAttention.{b}.weight"] = ours[f"{ours_}attention.{a}.weight"]
                if ff == 2:
                    sd[f"{hf_}1.EncDecAttention.{b}.weight"] = (
                        ours[f"{ours_}cross_attention.{a}.weight"])
            sd[f"{hf_}0.layer_norm.weight"] = ours[f"{ours_}attention_norm.weight"]
            if ff == 2:
                sd[f"{hf_}1.layer_norm.weight"] = ours[f"{ours_}cross_attention_norm.weight"]
            for a, b in (("w1", "wi_0"), ("w3", "wi_1"), ("w2", "wo")):
                sd[f"{hf_}{ff}.DenseReluDense.{b}.weight"] = ours[f"{ours_}feed_forward.{a}.weight"]
            sd[f"{hf_}{ff}.layer_norm.weight"] = ours[f"{ours_}ffn_norm.weight"]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight",
                                               "decoder.embed_tokens.weight"}
    return hf.eval()


def test_seq2seq_greedy_equals_transformers_t5(t5: nn.Module) -> None:
    hf = _to_hf_t5(t5)
    ours = generate_seq2seq(t5, SOURCES[:1], max_new_tokens=16, temperature=0, eos_id=None)[0]
    eos = ours[6]
    stopped = generate_seq2seq(t5, SOURCES[:1], max_new_tokens=16, temperature=0, eos_id=eos)[0]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(SOURCES[:1]), max_new_tokens=16, do_sample=False,
                             num_beams=1, eos_token_id=None)[0].tolist()
        theirs_stopped = hf.generate(torch.tensor(SOURCES[:1]), max_new_tokens=16,
                                     do_sample=False, num_beams=1, eos_token_id=eos)[0].tolist()
    assert theirs == [0, *ours]  # transformers returns the decoder start token too
    assert theirs_stopped == [0, *stopped, eos]


# -- fill in the middle ----------------------------------------------------------------------


@pytest.mark.parametrize("spm_order", [False, True])
def test_fim_prompt_is_the_training_format(spm_order: bool) -> None:
    prefix, suffix = [10, 11, 12], [20, 21]
    fim = Fim(SpecialIds(pad=0, eos=3, control=(), fim=FIM))
    expected = fim.infill_prompt(np.array(prefix), np.array(suffix), spm=spm_order).tolist()
    assert fim_prompt(prefix, suffix, FIM, spm=spm_order) == expected
    assert fim_prompt(prefix, suffix, FIM) == [60, 10, 11, 12, 62, 20, 21, 61]


def test_infill_is_greedy_decoding_of_the_prompt(decoder: nn.Module) -> None:
    prefix, suffix = [5, 6, 7, 8], [9, 10]
    middle = infill(decoder, prefix, suffix, fim_ids=FIM, max_new_tokens=12, eos_id=None)
    prompt = [FIM.prefix, *prefix, FIM.suffix, *suffix, FIM.middle]
    expected = generate(decoder, prompt, max_new_tokens=12, temperature=0)
    assert middle == expected and len(middle) == 12
    # it stops at <fim_pad> as at EOS, returning neither
    pad = FimIds(FIM.prefix, FIM.middle, FIM.suffix, pad=middle[5])
    assert infill(decoder, prefix, suffix, fim_ids=pad, max_new_tokens=12,
                  eos_id=None) == middle[: middle.index(middle[5])]
    assert infill(decoder, prefix, suffix, fim_ids=FIM, max_new_tokens=12,
                  eos_id=middle[3]) == middle[: middle.index(middle[3])]


def test_infill_exact_match(decoder: nn.Module) -> None:
    parts = (([5, 6, 7], [8, 9]), ([11, 12], [13, 14, 15]), ([20], [21]))
    greedy = [infill(decoder, p, s, fim_ids=FIM, max_new_tokens=8, eos_id=None) for p, s in parts]
    eos = greedy[0][3]
    middles = [g[: g.index(eos)] if eos in g else g for g in greedy]
    docs = [(np.array(p), np.array(m), np.array(s)) for (p, s), m in zip(parts, middles)]
    ended = [d for d, g in zip(docs, greedy) if eos in g]  # the greedy middle, then EOS
    assert ended and ended[0] is docs[0] and len(docs[0][1]) == 3
    prefix, middle, suffix = docs[0]
    misses = [(prefix, middle[:-1], suffix),  # the model writes more than this middle
              (prefix, np.append(middle, 1), suffix),  # nor does it write this one
              (prefix, middle, suffix)]  # right, but longer than max_new_tokens=2
    decoder.train()
    assert infill_exact_match(decoder, ended, fim_ids=FIM, max_new_tokens=8, eos_id=eos) == 1.0
    assert decoder.training  # put back as it was
    em = infill_exact_match(decoder, ended + misses[:2], fim_ids=FIM, max_new_tokens=8,
                            eos_id=eos)
    assert em == len(ended) / (len(ended) + 2)
    assert infill_exact_match(decoder, misses, fim_ids=FIM, max_new_tokens=2, eos_id=eos) == 0
    assert infill_exact_match(decoder, [], fim_ids=FIM, max_new_tokens=8) == 0.0
    decoder.eval()


def test_infill_exact_match_runs_in_eval_mode(decoder: nn.Module) -> None:
    modes: list[bool] = []
    handle = decoder.register_forward_pre_hook(lambda m, _: modes.append(m.training))
    try:
        decoder.train()
        infill_exact_match(decoder, [([5], [6], [7])], fim_ids=FIM, max_new_tokens=3)
    finally:
        handle.remove()
        decoder.eval()
    assert modes and not any(modes)


# -- masked LM -------------------------------------------------------------------------------


def test_fill_masks_ranks_the_model_logits(encoder: nn.Module) -> None:
    mask_id = 4
    tokens = [12, mask_id, 30, 31, mask_id, mask_id, 40]
    preds = fill_masks(encoder, tokens, mask_id, top_k=3)
    assert [p.position for p in preds] == [1, 4, 5]
    with torch.no_grad():
        logits = encoder(torch.tensor([tokens]))[0]  # (T, vocab)
    for p in preds:
        probs = logits[p.position].softmax(-1)
        assert len(p.ids) == len(p.probs) == 3
        assert p.ids[0] == int(logits[p.position].argmax())
        assert p.probs == sorted(p.probs, reverse=True) and sum(p.probs) <= 1 + 1e-6
        assert p.probs == pytest.approx(probs[p.ids].tolist(), abs=1e-6)
    assert fill_masks(encoder, [12, 13], mask_id) == []
    assert len(fill_masks(encoder, tokens, mask_id, top_k=1000)[0].ids) == VOCAB


# -- text with control pieces, and the command line ------------------------------------------

TEXTS = ["def add(x, y):\n    return x + y\n", "The cat sat on the mat. The dog ate a bone.\n"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tiny.model"
    return Tokenizer.load(train_tokenizer(TEXTS * 50, str(path), vocab_size=420))


def test_specials_in_text_map_to_their_ids(tokenizer: Tokenizer) -> None:
    text = "The <extra_id_10> sat<extra_id_1> on <mask>."
    ids = encode_with_specials(tokenizer, text, SENTINELS)
    s1, s10 = tokenizer.piece_to_id("<extra_id_1>"), tokenizer.piece_to_id("<extra_id_10>")
    assert ids.count(s10) == 1 and ids.count(s1) == 1
    assert ids[:3] == [*tokenizer.encode("The "), s10][:3]
    assert tokenizer.mask_id not in ids  # not asked for: spelled out
    assert decode_with_specials(tokenizer, ids, SENTINELS) == text
    assert tokenizer.decode(ids) == "The  sat on <mask>."  # plain decoding drops them


def _checkpoint(root: Path, cfg: ModelConfig, tokenizer: Tokenizer, objective: str) -> Path:
    model = _build(cfg)
    config = {"model": dataclasses.asdict(cfg), "objective": {"name": objective}}
    ckpt.save_checkpoint(root / "checkpoints", 1, {
        "app": ckpt.ModelOptimState(model, None), "config": ckpt.Record(config),
        "tokenizer_path": ckpt.Record(tokenizer.path)}, keep=1)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    v = tokenizer.vocab_size
    return {"decoder": _checkpoint(root / "dec", decoder_config(v), tokenizer, "fim"),
            "encoder": _checkpoint(root / "enc", encoder_config(v), tokenizer, "mlm"),
            "encoder_decoder": _checkpoint(root / "t5", t5_config(v), tokenizer, "span")}


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = generate_main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_decoder_continues_and_infills(runs: dict[str, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _cli(capsys, str(runs["decoder"]), "--prompt", "def ", "--max-new-tokens",
                        "4", "--temperature", "0")
    assert rc == 0 and out.startswith("--- 'def '\ndef ")
    rc, out, err = _cli(capsys, str(runs["decoder"]), "--prefix", "def add(", "--suffix",
                        "):\n", "--max-new-tokens", "3", "--temperature", "0")
    assert rc == 0 and err == "", err
    assert out.startswith("--- middle\n") and "\ndef add(" in out
    rc, _, err = _cli(capsys, str(runs["decoder"]), "--prompt", "x", "--prefix", "def ")
    assert rc == 2 and err.count("\n") == 1 and "one or the other" in err


def test_cli_infill_needs_fim_pieces(runs: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old.model"  # a tokenizer made before the objectives' pieces existed
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 20), model_writer=model,
                                   vocab_size=60, model_type="bpe", pad_id=0, unk_id=1,
                                   bos_id=2, eos_id=3, minloglevel=2)
    old.write_bytes(model.getvalue())
    rc, _, err = _cli(capsys, str(runs["decoder"]), "--prefix", "a", "--tokenizer", str(old))
    assert rc == 2 and err.count("\n") == 1
    assert "<fim_prefix>" in err and "pretrain-train-tokenizer" in err


def test_cli_encoder_fills_masks(runs: dict[str, Path], tokenizer: Tokenizer,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _cli(capsys, str(runs["encoder"]), "--prompt", "The <mask> sat on <mask>.",
                      "--top-k", "3")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "--- 'The <mask> sat on <mask>.'"
    assert [line.split(":")[0] for line in lines[2:]] == ["<mask> 0", "<mask> 1"]
    assert all(len(re.findall(r" [01]\.\d{3}(?:  |$)", line)) == 3 for line in lines[2:])
    model = _build(encoder_config(tokenizer.vocab_size))
    assert lines[1] == fill_mask_text(model, tokenizer, "The <mask> sat on <mask>.")[0]
    for argv, says in ((["--prompt", "no mask here"], "has no <mask>"),
                       (["--prompt", "a <mask>", "--temperature", "0"], "--temperature"),
                       (["--prefix", "a"], "--prefix/--suffix"),
                       ([], "needs --prompt")):
        rc, _, err = _cli(capsys, str(runs["encoder"]), *argv)
        assert rc == 2 and err.count("\n") == 1 and says in err, err


def test_cli_encoder_decoder_shows_sentinels(runs: dict[str, Path], tokenizer: Tokenizer,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    prompt = "The <extra_id_0> sat on <extra_id_1>."
    rc, out, _ = _cli(capsys, str(runs["encoder_decoder"]), "--prompt", prompt,
                      "--max-new-tokens", "6", "--temperature", "0")
    assert rc == 0
    model = _build(t5_config(tokenizer.vocab_size))
    ids = encode_with_specials(tokenizer, prompt, SENTINELS) + [tokenizer.eos_id]
    [new] = generate_seq2seq(model, [ids], max_new_tokens=6, temperature=0)
    assert out == f"--- {prompt!r}\n{decode_with_specials(tokenizer, new, SENTINELS)}\n"
    rc, _, err = _cli(capsys, str(runs["encoder_decoder"]), "--suffix", "x")
    assert rc == 2 and "encoder_decoder" in err and err.count("\n") == 1
