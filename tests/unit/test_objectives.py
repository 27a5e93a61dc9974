"""Pre-training objectives: BERT masking, T5 span corruption and fill-in-the-middle as pure
functions of (windows, keys), and through the loader: the same corruption on every layout, with
workers and after resume, fixed for validation, new for a window read again in a later epoch."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.config import DataConfig, ObjectiveConfig
from pretrain.data import Batch, DataError, ShardedWindowLoader, Tokenizer
from pretrain.data.build import PreparedData, build_loader
from pretrain.data.objectives import (
    Clm,
    Fim,
    Mlm,
    Objective,
    Span,
    SpecialIds,
    build_objective,
    infill_split,
    noise_counts,
    window_keys,
)
from pretrain.data.prepare import prepare, train_tokenizer_from_source
from pretrain.data.tokenizer import FimIds
from pretrain.models.loss import IGNORE_INDEX

PAD, BOS, EOS, MASK = 0, 2, 3, 4
SENTINELS = tuple(range(5, 105))
FIM = FimIds(prefix=105, middle=106, suffix=107, pad=108)
IDS = SpecialIds(pad=PAD, eos=EOS, control=tuple(range(109)), mask=MASK, sentinels=SENTINELS,
                 fim=FIM)
FIRST_NORMAL, V = 109, 1000


def windows(n: int, length: int, *, seed: int = 0, doc_rate: float = 0.05) -> np.ndarray:
    """(n, length) ordinary tokens with EOS ending documents here and there, a few BOS and PAD."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(FIRST_NORMAL, V, size=(n, length))
    u = rng.random((n, length))
    tokens[u < doc_rate] = EOS
    tokens[(u >= doc_rate) & (u < doc_rate + 0.01)] = BOS
    tokens[(u >= doc_rate + 0.01) & (u < doc_rate + 0.015)] = PAD
    return tokens


def doc_ids_of(tokens: np.ndarray) -> np.ndarray:
    """(B, W) document index of each token: the token after an EOS starts the next document."""
    ends = (tokens[:, :-1] == EOS).astype(np.int64)
    return np.concatenate([np.zeros((len(tokens), 1), np.int64), np.cumsum(ends, 1)], axis=1)


def keys(n: int, seed: int = 0) -> np.ndarray:
    return window_keys(seed, "train", np.arange(n))


# -- keys ------------------------------------------------------------------------------------


def test_window_keys_depend_on_seed_stream_and_position_only() -> None:
    k = window_keys(1, "train", np.arange(1000))
    assert k.dtype == np.uint64 and len(set(k.tolist())) == 1000
    np.testing.assert_array_equal(k[[5, 7]], window_keys(1, "train", np.array([5, 7])))
    assert not set(k.tolist()) & set(window_keys(2, "train", np.arange(1000)).tolist())
    assert not set(k.tolist()) & set(window_keys(1, "eval:val", np.arange(1000)).tolist())


# -- masked LM -------------------------------------------------------------------------------


def test_mlm_predicts_exactly_round_rate_times_seq_len_and_never_a_control_token() -> None:
    tokens = windows(200, 65, doc_rate=0.2)
    out = Mlm(IDS, V).corrupt(tokens, keys(200))
    x = tokens[:, :-1]
    assert out.inputs.shape == out.targets.shape == (200, 64)
    chosen = out.targets != IGNORE_INDEX
    assert (chosen.sum(1) == round(0.15 * 64)).all()
    np.testing.assert_array_equal(out.targets[chosen], x[chosen])
    special = np.isin(x, IDS.control)
    assert special.any() and not (chosen & special).any()
    np.testing.assert_array_equal(out.inputs[special], x[special])  # EOS/BOS/PAD stay
    np.testing.assert_array_equal(out.inputs[~chosen], x[~chosen])


def test_mlm_chooses_every_candidate_when_there_are_fewer() -> None:
    tokens = np.full((3, 33), EOS)
    tokens[:, [1, 5, 9]] = 500
    out = Mlm(IDS, V, mask_rate=0.5).corrupt(tokens, keys(3))
    assert ((out.targets != IGNORE_INDEX).sum(1) == 3).all()


def test_mlm_replaces_80_10_10() -> None:
    tokens = windows(3000, 65, doc_rate=0.0)
    out = Mlm(IDS, V).corrupt(tokens, keys(3000, seed=5))
    chosen = out.targets != IGNORE_INDEX
    original, now = tokens[:, :-1][chosen], out.inputs[chosen]
    n = chosen.sum()
    assert n == 3000 * 10
    masked = now == MASK
    kept = now == original
    randomized = ~masked & ~kept
    # 30000 draws: binomial standard deviations are 0.0023 (80%) and 0.0017 (10%)
    assert abs(masked.mean() - 0.8) < 0.01
    assert abs(randomized.mean() - 0.1) < 0.008 and abs(kept.mean() - 0.1) < 0.008
    assert now[randomized].min() >= FIRST_NORMAL and now[randomized].max() < V
    # the random replacements cover the ordinary vocabulary, not a corner of it
    assert len(np.unique(now[randomized])) > 0.9 * (V - FIRST_NORMAL)


def test_mlm_fractions_come_from_the_config() -> None:
    tokens = windows(500, 65, doc_rate=0.0)
    out = Mlm(IDS, V, mask_rate=0.25, mask_token_fraction=0.0,
              random_token_fraction=0.0).corrupt(tokens, keys(500))
    chosen = out.targets != IGNORE_INDEX
    assert (chosen.sum(1) == 16).all()
    np.testing.assert_array_equal(out.inputs, tokens[:, :-1])  # predicted, all left unchanged


# -- span corruption -------------------------------------------------------------------------


def t5_lengths(inputs_length: int, density: float, mean: float) -> tuple[int, int]:
    """T5's random_spans_helper (HF's compute_input_and_target_lengths), for comparison."""
    def lengths(n: int) -> tuple[int, int]:
        noise = int(round(n * density))
        spans = int(round(noise / mean))
        return n - noise + spans + 1, noise + spans + 1

    n = inputs_length
    while lengths(n + 1)[0] <= inputs_length:
        n += 1
    return n, lengths(n)[1]


@pytest.mark.parametrize("seq_len", [64, 128, 512, 568])
def test_span_window_and_target_lengths_are_t5s(seq_len: int) -> None:
    span = Span(IDS)
    assert (span.window_len(seq_len), span.target_len(seq_len)) == t5_lengths(seq_len, 0.15, 3)
    assert span.window_len(512) == 568 and span.target_len(512) == 114  # T5's well-known pair


def unspan(inputs: np.ndarray, targets: np.ndarray,
           sentinels: tuple[int, ...] = SENTINELS) -> list[int]:
    """The raw window back from a span-corrupted row: each sentinel of the input replaced by what
    follows the same sentinel in the target. Also checks the sentinels come in order."""
    spans: dict[int, list[int]] = {}
    current = None
    assert targets[-1] == EOS and inputs[-1] == EOS
    for t in targets[:-1].tolist():
        if t in sentinels:
            assert t == sentinels[len(spans)]  # sentinel order: <extra_id_0>, <extra_id_1>, ...
            current = spans.setdefault(t, [])
        else:
            assert current is not None
            current.append(t)
    raw: list[int] = []
    seen = 0
    for t in inputs[:-1].tolist():
        if t in sentinels:
            assert t == sentinels[seen] and spans[t]
            seen += 1
            raw.extend(spans[t])
        else:
            raw.append(t)
    assert seen == len(spans)
    return raw


@pytest.mark.parametrize("seq_len,density,mean", [(16, 0.15, 3.0), (37, 0.15, 3.0),
                                                  (128, 0.15, 3.0), (100, 0.3, 2.0),
                                                  (64, 0.5, 8.0)])
def test_span_corruption_is_exact_and_reversible(seq_len: int, density: float,
                                                 mean: float) -> None:
    span = Span(IDS, noise_density=density, mean_span_length=mean)
    W = span.window_len(seq_len)
    tokens = windows(50, W, doc_rate=0.1)  # EOS inside the window is an ordinary token here
    out = span.corrupt(tokens, keys(50))
    assert out.inputs.shape == (50, seq_len)
    assert out.targets.shape == out.decoder_inputs.shape == (50, span.target_len(seq_len))
    for row in range(50):
        assert unspan(out.inputs[row], out.targets[row]) == tokens[row].tolist()
    assert (out.decoder_inputs[:, 0] == PAD).all()
    np.testing.assert_array_equal(out.decoder_inputs[:, 1:], out.targets[:, :-1])
    again = span.corrupt(tokens, keys(50))
    np.testing.assert_array_equal(again.inputs, out.inputs)
    if noise_counts(W, density, mean)[1] > 1:  # one span is always last (T5, without roll)
        assert not np.array_equal(span.corrupt(tokens, keys(50, seed=1)).inputs, out.inputs)


def test_span_refuses_more_spans_than_sentinels() -> None:
    span = Span(IDS)
    with pytest.raises(DataError, match=r"makes 114 noise spans but the tokenizer has 100 "
                                        r"sentinels; lower seq_len"):
        span.window_len(2048)
    with pytest.raises(ValueError, match="exactly seq_len=2"):
        span.window_len(2)


# -- fill in the middle ----------------------------------------------------------------------


def segments(row: np.ndarray, ids: np.ndarray) -> list[tuple[int, int]]:
    bounds = np.flatnonzero(np.diff(ids)) + 1
    return list(zip([0, *bounds], [*bounds, len(row)]))


def window_of(out: object) -> np.ndarray:
    """The whole transformed window back from inputs and targets (shifted by one)."""
    return np.concatenate([out.inputs, out.targets[:, -1:]], axis=1)  # type: ignore[attr-defined]


def unfim(seg: np.ndarray, middle: np.ndarray) -> tuple[str, list[int]] | None:
    """(mode, content without the 3 cut tokens) of a transformed segment's content, or None
    when it was left alone; `middle` marks the middle's tokens. With an empty prefix PSM and SPM
    read the same: mode "either"."""
    p, s, m = FIM.prefix, FIM.suffix, FIM.middle
    seg_l = seg.tolist()
    if not seg_l or seg_l[0] != p:
        assert not middle.any()
        return None
    n_mid = int(middle.sum())
    assert middle[len(seg_l) - n_mid:].all()  # the middle ends the content
    mid = seg_l[len(seg_l) - n_mid:]
    if seg_l[1] == s:  # SPM: <pre> <suf> suffix <mid> prefix middle
        at = seg_l.index(m)
        suffix, prefix = seg_l[2:at], seg_l[at + 1:len(seg_l) - n_mid]
        return "spm" if prefix else "either", prefix + mid + suffix
    at_s, at_m = seg_l.index(s), seg_l.index(m)  # PSM: <pre> prefix <suf> suffix <mid> middle
    assert at_m == len(seg_l) - n_mid - 1
    return "psm", seg_l[1:at_s] + mid + seg_l[at_s + 1:at_m]


@pytest.mark.parametrize("spm_rate", [0.0, 0.5, 1.0])
def test_fim_rewrites_each_document_and_keeps_its_length(spm_rate: float) -> None:
    tokens = windows(300, 65, doc_rate=0.04)
    ids = doc_ids_of(tokens)
    out = Fim(IDS, fim_rate=1.0, fim_spm_rate=spm_rate).corrupt(tokens, keys(300), ids)
    assert out.inputs.shape == out.targets.shape == out.middle_mask.shape == (300, 64)
    new = window_of(out)
    np.testing.assert_array_equal(doc_ids_of(new), ids)  # same segments, same document ids
    middle = np.concatenate([np.zeros((300, 1), bool), out.middle_mask], axis=1)
    modes = {"psm": 0, "spm": 0, "either": 0, None: 0}
    for row in range(300):
        for a, b in segments(tokens[row], ids[row]):
            if tokens[row, b - 1] == EOS:
                assert new[row, b - 1] == EOS  # the document's EOS stays last
                b -= 1
            got = unfim(new[row, a:b], middle[row, a:b])
            modes[None if got is None else got[0]] += 1
            if got is None:
                np.testing.assert_array_equal(new[row, a:b], tokens[row, a:b])
                continue
            content = tokens[row, a:b].tolist()
            assert got[1] == content[:len(content) - 3]  # the last 3 suffix tokens were cut
    assert modes["psm"] > 50 if spm_rate < 1 else modes["psm"] == 0
    assert modes["spm"] > 50 if spm_rate > 0 else modes["spm"] == 0
    assert modes[None] > 0  # segments whose suffix is too short stay as they are


def test_fim_rate_0_is_clm_and_fim_rate_applies_per_document() -> None:
    tokens = windows(200, 65, doc_rate=0.02)
    ids = doc_ids_of(tokens)
    clm = Clm().corrupt(tokens, keys(200))
    none = Fim(IDS, fim_rate=0.0).corrupt(tokens, keys(200), ids)
    np.testing.assert_array_equal(none.inputs, clm.inputs)
    np.testing.assert_array_equal(none.targets, clm.targets)
    assert not none.middle_mask.any()
    half = window_of(Fim(IDS, fim_rate=0.5, fim_spm_rate=0.0).corrupt(tokens, keys(200), ids))
    lengths = [b - a for row in range(200) for a, b in segments(tokens[row], ids[row])]
    starts = [half[row, a] for row in range(200) for a, _ in segments(tokens[row], ids[row])]
    long = np.array(lengths) > 20  # long segments nearly always have a suffix to cut
    assert 0.4 < np.mean(np.array(starts)[long] == FIM.prefix) < 0.6


def test_fim_needs_document_ids() -> None:
    with pytest.raises(ValueError, match="document ids"):
        Fim(IDS).corrupt(windows(2, 9), keys(2))


def test_infill_split_and_prompt() -> None:
    doc = np.arange(200, 260)
    fim = Fim(IDS)
    for key in window_keys(3, "infill", np.arange(50)):
        prefix, middle, suffix = infill_split(doc, key, max_middle=8)
        assert 1 <= len(middle) <= 8
        np.testing.assert_array_equal(np.concatenate([prefix, middle, suffix]), doc)
        again = infill_split(doc, key, max_middle=8)
        assert all(np.array_equal(x, y) for x, y in zip(again, (prefix, middle, suffix)))
    p, m = np.array([201, 202]), np.array([203])
    s = np.array([204])
    assert fim.infill_prompt(p, s).tolist() == [FIM.prefix, 201, 202, FIM.suffix, 204,
                                                FIM.middle]
    assert fim.infill_prompt(p, s, spm=True).tolist() == [FIM.prefix, FIM.suffix, 204,
                                                          FIM.middle, 201, 202]
    assert fim.arrange(p, m, s).tolist()[-1] == 203
    assert len(infill_split([7, 8], 0, max_middle=24)[1]) in (1, 2)


# -- through the loader ----------------------------------------------------------------------

VOCAB = 512
SEQ = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Tokenizer]:
    root = tmp_path_factory.mktemp("objectives")
    tok = train_tokenizer_from_source("builtin", str(root / "tok.model"), vocab_size=VOCAB,
                                      sample_bytes=60_000)
    prepare("builtin", tok, str(root / "data"), shard_tokens=3000, val_fraction=0.2,
            max_bytes=60_000)
    return root / "data", Tokenizer.load(tok)


def objective(data: tuple[Path, Tokenizer], name: str, **kw: object) -> Objective:
    return build_objective(ObjectiveConfig(name=name, **kw), data[1], vocab_size=VOCAB)


def make(data: tuple[Path, Tokenizer], obj: Objective | None, **kw: object) -> ShardedWindowLoader:
    args: dict[str, object] = dict(seq_len=SEQ, micro_batch_size=4, vocab_size=VOCAB, seed=7,
                                   objective=obj)
    return ShardedWindowLoader(str(data[0]), "train", **{**args, **kw})  # type: ignore[arg-type]


FIELDS = ("inputs", "targets", "doc_ids", "positions", "decoder_inputs", "middle_mask")


def same(a: list[Batch], b: list[Batch]) -> bool:
    def eq(p: torch.Tensor | None, q: torch.Tensor | None) -> bool:
        return (p is None and q is None) or (p is not None and q is not None
                                             and torch.equal(p, q))

    return len(a) == len(b) and all(eq(getattr(x, f), getattr(y, f))
                                    for x, y in zip(a, b) for f in FIELDS)


def cat(parts: list[Batch]) -> Batch:
    return Batch(**{f: None if getattr(parts[0], f) is None
                    else torch.cat([getattr(p, f) for p in parts]) for f in FIELDS})


def batches(loader: ShardedWindowLoader, n: int) -> list[Batch]:
    return [loader.next_batch() for _ in range(n)]


OBJECTIVES = [("mlm", {}), ("span", {}), ("fim", {"fim_rate": 0.9})]


def test_default_is_next_token_prediction_bit_for_bit(data: tuple[Path, Tokenizer]) -> None:
    for masking in (False, True):
        plain = batches(make(data, None, document_masking=masking, restart_positions=masking), 4)
        clm = make(data, objective(data, "clm"), document_masking=masking,
                   restart_positions=masking)
        assert clm.window_len == SEQ + 1
        assert same(plain, batches(clm, 4))
        assert all(b.decoder_inputs is None and b.middle_mask is None for b in plain)


@pytest.mark.parametrize("name,kw", OBJECTIVES)
def test_corruption_does_not_depend_on_layout_or_workers(data: tuple[Path, Tokenizer],
                                                         name: str, kw: dict) -> None:
    obj = objective(data, name, **kw)
    reference = make(data, obj, micro_batch_size=2)  # 4 accumulation micro-steps of 2
    ranks = [make(data, obj, micro_batch_size=4, dp_rank=r, dp_size=2) for r in range(2)]
    workers = make(data, obj, micro_batch_size=8, num_workers=2)
    for _ in range(3):
        expected = cat(batches(reference, 4))
        assert same([cat([r.next_batch() for r in ranks])], [expected])
        assert same([workers.next_batch()], [expected])
    workers.close()
    again = make(data, obj, micro_batch_size=8)
    other_seed = make(data, obj, micro_batch_size=8, seed=8)
    first = again.next_batch()
    assert same([first], [cat(batches(make(data, obj, micro_batch_size=2), 4))])
    assert not torch.equal(first.inputs, other_seed.next_batch().inputs)


@pytest.mark.parametrize("name,kw", OBJECTIVES)
def test_resume_continues_the_same_corruption(data: tuple[Path, Tokenizer], name: str,
                                              kw: dict) -> None:
    obj = objective(data, name, **kw)
    full = batches(make(data, obj), 6)
    first = make(data, obj)
    batches(first, 2)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make(data, obj, num_workers=2)
    resumed.load_state_dict(state)
    assert same(batches(resumed, 4), full[2:])
    resumed.close()


def test_a_window_read_in_a_later_epoch_is_corrupted_anew(data: tuple[Path, Tokenizer]) -> None:
    loader = make(data, objective(data, "mlm"), micro_batch_size=64)
    per_epoch = loader.windows_per_epoch
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    pairs = 0
    differ = 0
    while loader.cursor < 2 * per_epoch:
        batch = loader.next_batch()
        for row, w in enumerate(loader.last_rows.windows.tolist()):
            x, y = batch.inputs[row], batch.targets[row]
            if w in seen:
                pairs += 1
                differ += not torch.equal(seen[w][1], y)  # other tokens chosen
            else:
                seen[w] = (x, y)
    assert pairs > 0.9 * per_epoch and differ > 0.95 * pairs


@pytest.mark.parametrize("name,kw", OBJECTIVES)
def test_validation_corruption_is_fixed_and_the_same_on_every_layout(
        data: tuple[Path, Tokenizer], name: str, kw: dict) -> None:
    obj = objective(data, name, **kw)
    dirs = str(data[0])

    def val(mb: int, rank: int = 0, size: int = 1) -> list[Batch]:
        loader = ShardedWindowLoader(dirs, "val", seq_len=SEQ, micro_batch_size=mb,
                                     vocab_size=VOCAB, dp_rank=rank, dp_size=size, seed=7,
                                     objective=obj)
        return list(loader.eval_windows(10))

    one = val(10)
    assert same(one, val(10))
    real = cat(one)
    two = [val(3, r, 2) for r in range(2)]  # 12 rows per step, 2 steps: 14 padding rows
    rows = [cat([two[r][i] for r in range(2)]) for i in range(2)]
    stacked = cat(rows)
    assert same([Batch(**{f: None if getattr(stacked, f) is None else getattr(stacked, f)[:10]
                          for f in FIELDS})], [real])
    assert (stacked.targets[10:] == IGNORE_INDEX).all()
    if stacked.middle_mask is not None:
        assert not stacked.middle_mask[10:].any()
    train_first = make(data, obj, micro_batch_size=10).next_batch()
    assert not torch.equal(train_first.inputs, real.inputs)  # another stream, other keys


def test_span_batches_corrupt_windows_of_window_len(data: tuple[Path, Tokenizer]) -> None:
    span = objective(data, "span")
    loader = make(data, span, micro_batch_size=8, seq_len=32)
    W = span.window_len(32)
    assert loader.window_len == W == 34  # T5's lengths for 32 encoder tokens
    batch = loader.next_batch()
    assert batch.inputs.shape == (8, 32)
    assert batch.targets.shape == batch.decoder_inputs.shape == (8, span.target_len(32))
    assert "decoder_inputs" in batch.model_kwargs()
    sentinels = tuple(data[1].sentinel_ids)
    for row, w in enumerate(loader.last_rows.windows.tolist()):
        raw = loader.sources[0].window(int(w))
        assert len(raw) == W
        assert unspan(batch.inputs[row].numpy(), batch.targets[row].numpy(),
                      sentinels) == raw.tolist()


def test_fim_keeps_the_document_ids_and_masks(data: tuple[Path, Tokenizer]) -> None:
    fim = objective(data, "fim", fim_rate=1.0)
    masked = dict(document_masking=True, restart_positions=True, micro_batch_size=16)
    clm = batches(make(data, None, **masked), 3)
    got = batches(make(data, fim, **masked), 3)
    for a, b in zip(clm, got):
        assert torch.equal(a.doc_ids, b.doc_ids) and torch.equal(a.positions, b.positions)
        assert b.middle_mask is not None and b.middle_mask.any()
        assert not torch.equal(a.inputs, b.inputs)
        # a rewritten document holds its own tokens (less the three cut) and the FIM pieces
        pieces = set(fim.ids)  # type: ignore[attr-defined]
        for x, y in zip(window_of(a).tolist(), window_of(b).tolist()):
            assert not Counter(t for t in y if t not in pieces) - Counter(x)
            assert sum(t in pieces for t in y) % 3 == 0
    zero = objective(data, "fim", fim_rate=0.0)
    assert all(torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
               for a, b in zip(clm, batches(make(data, zero, **masked), 3)))


@pytest.mark.parametrize("name", ["mlm", "span"])
def test_document_masking_with_encoder_objectives_does_not_crash(
        data: tuple[Path, Tokenizer], name: str) -> None:
    batch = make(data, objective(data, name), document_masking=True).next_batch()
    assert batch.inputs.shape == (4, SEQ)
    if name == "span":  # its inputs are not the window's tokens: no document ids to give
        assert batch.doc_ids is None


def test_build_loader_takes_the_objective(data: tuple[Path, Tokenizer]) -> None:
    span = objective(data, "span")
    cfg = DataConfig(dir=str(data[0]))
    prepared = PreparedData({"data": str(data[0])}, data[1].path)
    loader = build_loader(cfg, prepared, "train", seq_len=SEQ, micro_batch_size=2, dp_rank=0,
                          dp_size=1, seed=1, vocab_size=VOCAB, objective=span)
    assert loader.window_len == span.window_len(SEQ)
    assert loader.next_batch().decoder_inputs is not None
    loader.close()
