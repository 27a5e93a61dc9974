"""The objectives' special pieces in the tokenizer: reserved as control symbols at fixed ids,
never produced by encoding text, dropped by decoding, required with a clear message, and the
default tokenizer's cache keyed by the tokenizer format."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import sentencepiece as spm

from pretrain.config import DataConfig, ObjectiveConfig
from pretrain.data import BOS_ID, EOS_ID, PAD_ID, UNK_ID, DataError, Tokenizer, iter_documents
from pretrain.data import prepare as prepare_module
from pretrain.data.objectives import build_objective
from pretrain.data.prepare import train_tokenizer_from_source
from pretrain.data.tokenizer import (
    CONTROL_SYMBOLS,
    FIM_PIECES,
    MASK,
    SENTINELS,
    TOKENIZER_FORMAT,
    _trainer_options,
)

VOCAB = 512


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok") / "tok.model"
    return Tokenizer.load(train_tokenizer_from_source("builtin", str(out), vocab_size=VOCAB,
                                                      sample_bytes=60_000))


@pytest.fixture(scope="module")
def old_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A tokenizer as pretrain trained them before the control symbols (format 1)."""
    out = tmp_path_factory.mktemp("old") / "old.model"
    options = _trainer_options(VOCAB, 100_000, 0.9999, 1)
    del options["control_symbols"]
    model = io.BytesIO()
    lines = [ln for doc in iter_documents("builtin", max_bytes=60_000) for ln in doc.split("\n")
             if ln]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **options)
    out.write_bytes(model.getvalue())
    return Tokenizer.load(str(out))


def test_special_pieces_have_fixed_ids(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok._sp.unk_id(), tok.bos_id, tok.eos_id) == (PAD_ID, UNK_ID, BOS_ID,
                                                                      EOS_ID)
    assert tok.mask_id == 4 == tok.piece_to_id(MASK)
    assert tok.sentinel_ids == list(range(5, 105))
    assert [tok.piece_to_id(p) for p in SENTINELS[:2]] == [5, 6]
    assert tuple(tok.fim_ids) == (105, 106, 107, 108)
    assert tok.fim_ids.prefix == tok.piece_to_id(FIM_PIECES[0])
    assert tok.fim_ids.middle == tok.piece_to_id("<fim_middle>")
    assert tok.fim_ids.suffix == tok.piece_to_id("<fim_suffix>")
    assert tok.control_ids == list(range(0, 4 + len(CONTROL_SYMBOLS)))
    assert tok.piece_to_id("\n") == 4 + len(CONTROL_SYMBOLS)  # look it up; it moved up by 105
    assert tok.piece_to_id("<no such piece>") is None
    assert tok.vocab_size == VOCAB


def test_text_never_encodes_to_a_control_symbol(tok: Tokenizer) -> None:
    text = "x = '<mask>' + <extra_id_0> + <fim_prefix><fim_middle></s><pad>\n"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.control_ids)
    assert tok.decode(ids) == text


def test_decode_drops_control_pieces(tok: Tokenizer) -> None:
    ids = tok.encode("def f():\n    pass")
    mixed = [tok.fim_ids.prefix, *ids[:3], tok.mask_id, tok.sentinel_ids[7], *ids[3:],
             tok.fim_ids.middle, tok.eos_id]
    assert tok.decode(mixed) == "def f():\n    pass"


def test_each_objective_requires_its_pieces(tok: Tokenizer, old_tok: Tokenizer) -> None:
    for name in ("clm", "mlm", "span", "fim"):
        tok.require_specials(name)
    old_tok.require_specials("clm")  # next-token prediction needs nothing
    for name, missing in (("mlm", "<mask>"), ("span", "<extra_id_0>"), ("fim", "<fim_prefix>")):
        with pytest.raises(DataError) as e:
            old_tok.require_specials(name)
        message = str(e.value)
        assert old_tok.path in message and repr(name) in message and missing in message
        assert "pretrain-train-tokenizer" in message and "data.tokenizer=null" in message
    with pytest.raises(DataError, match="100 missing"):
        old_tok.require_specials("span")
    with pytest.raises(DataError, match="<mask>"):
        old_tok.mask_id  # noqa: B018
    with pytest.raises(ValueError, match="unknown objective"):
        tok.require_specials("mlmm")


def test_build_objective_refuses_a_tokenizer_without_the_pieces(old_tok: Tokenizer) -> None:
    assert build_objective(ObjectiveConfig(name="clm"), old_tok, vocab_size=VOCAB).name == "clm"
    with pytest.raises(DataError, match="lacks the special pieces objective 'fim' needs"):
        build_objective(ObjectiveConfig(name="fim"), old_tok, vocab_size=VOCAB)


def test_tokenizer_cache_key_includes_the_format(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A default tokenizer cached by an older format is not reused: another path, retrained."""
    made: list[str] = []

    def fake_train(source: str, path: str, **kw: object) -> str:
        made.append(path)
        Path(path).write_bytes(b"model")
        return path

    monkeypatch.setattr(prepare_module, "train_tokenizer_from_source", fake_train)
    cfg = DataConfig()
    paths = []
    for version in (TOKENIZER_FORMAT - 1, TOKENIZER_FORMAT, TOKENIZER_FORMAT):
        monkeypatch.setattr(prepare_module, "TOKENIZER_FORMAT", version)
        paths.append(prepare_module._cached_tokenizer(cfg, str(tmp_path), "builtin", VOCAB))
    assert paths[0] != paths[1] == paths[2]
    assert made == paths[:2]  # the current format trains once, then reuses its own


def test_hf_export_makes_the_control_pieces_special(tok: Tokenizer) -> None:
    from pretrain.interop.hf import spm_to_hf_tokenizer

    hf = spm_to_hf_tokenizer(tok.path)
    assert hf.token_to_id("<mask>") == tok.mask_id
    assert hf.token_to_id("<extra_id_99>") == tok.sentinel_ids[-1]
    ids = tok.encode("a = 1")
    assert hf.decode([tok.fim_ids.prefix, *ids, tok.sentinel_ids[0]],
                     skip_special_tokens=True) == "a = 1"
