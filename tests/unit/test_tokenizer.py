"""Tokenizer training and loading: exact round trips, fixed special ids, fingerprints, errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pretrain.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    DataError,
    Tokenizer,
    iter_documents,
    train_tokenizer,
    train_tokenizer_from_source,
)
from tools import train_tokenizer as train_tokenizer_tool

VOCAB = 512
CODE = (
    "import os\n\n\n"
    "class Foo(Bar):\n"
    '    """Döcstring with ünïcode, 中文 and an emoji 🐍 (and 👨\u200d👩\u200d👧)."""\n\n'
    "\tdef f(self, x):  # tab-indented, trailing spaces   \n"
    "\t\treturn {'a': [1, 2, 3_000], \"b\": x ** 0.5}\r\n"
    "        \n"
    "    \n"
    "   leading spaces, \x0bodd\x0c controls \x00 and a null\n"
    "no newline at the end"
)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("tok") / "tiny.model"
    return train_tokenizer_from_source("builtin", str(out), vocab_size=VOCAB,
                                       sample_bytes=200_000)


@pytest.fixture(scope="module")
def tok(tok_path: str) -> Tokenizer:
    return Tokenizer.load(tok_path)


@pytest.mark.parametrize("text", [
    CODE, "", " ", "\n", "\n\n\t \n", "  x", "x  ", "12345678901234567890", "🙂" * 5,
])
def test_round_trip_is_exact(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_on_real_code(tok: Tokenizer) -> None:
    docs = list(iter_documents("builtin", max_bytes=300_000))
    assert len(docs) > 5
    assert all(tok.decode(tok.encode(doc)) == doc for doc in docs)


def test_special_ids_are_fixed(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert tok._sp.unk_id() == UNK_ID
    assert tok.vocab_size == VOCAB
    ids = tok.encode("def f():", bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert tok.decode(ids) == "def f():"  # specials decode to nothing


def test_newline_is_one_token_and_digits_split(tok: Tokenizer) -> None:
    assert tok.encode("\n") == [tok._sp.piece_to_id("\n")]
    assert len(tok.encode("2024")) == 4


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    texts = [CODE, "a b", ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, eos=True)[1][-1] == EOS_ID


def test_fingerprint_is_the_model_hash_and_follows_the_model(tok: Tokenizer, tmp_path: Path):
    assert tok.fingerprint == hashlib.sha256(Path(tok.path).read_bytes()).hexdigest()
    docs = list(iter_documents("builtin", max_bytes=200_000))
    same = train_tokenizer(docs, str(tmp_path / "same.model"), vocab_size=VOCAB)
    other = train_tokenizer(docs, str(tmp_path / "other.model"), vocab_size=VOCAB + 64)
    assert Tokenizer.load(same).fingerprint == tok.fingerprint  # training is deterministic
    assert Tokenizer.load(other).fingerprint != tok.fingerprint


def test_load_missing_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.model does not exist"):
        Tokenizer.load(str(tmp_path / "nope.model"))


def test_load_corrupt_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(DataError, match="bad.model is not a valid SentencePiece model"):
        Tokenizer.load(str(bad))


def test_failed_training_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "t.model"
    with pytest.raises(DataError, match="vocab_size=100000"):
        train_tokenizer(["tiny corpus\n"] * 3, str(out), vocab_size=100_000)
    with pytest.raises(DataError, match="no text"):
        train_tokenizer(["", "\n\n"], str(out), vocab_size=VOCAB)
    assert os.listdir(tmp_path) == []


def test_tool_trains_and_reports_errors_in_one_line(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(CODE * 50)
    out = tmp_path / "t.model"
    assert train_tokenizer_tool.main(["--source", str(corpus), "--out", str(out),
                                      "--vocab-size", "512"]) == 0
    assert Tokenizer.load(str(out)).vocab_size == 512
    assert "vocabulary 512" in capsys.readouterr().out
    assert train_tokenizer_tool.main(["--source", str(tmp_path / "missing.txt"),
                                      "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data source") and "missing.txt" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
