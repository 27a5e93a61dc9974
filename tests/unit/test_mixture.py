"""Weighted mixtures of prepared datasets: proportions, a global order independent of ranks and
threads, per-source positions and token counts, weight changes on resume, and bad weights."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from pretrain.config import DataConfig
from pretrain.data import (
    EOS_ID,
    DataError,
    ShardedWindowLoader,
    build_loader,
    data_config_errors,
    ensure_data,
    parse_mix,
    write_manifest,
    write_shard,
)
from pretrain.data.mixture import assign_sources, slice_bounds
from pretrain.data.prepare import prepare
from pretrain.data.tokenizer import train_tokenizer
from pretrain.models.loss import IGNORE_INDEX
from tests.unit.test_prepare import make_docs, write_jsonl

VOCAB = 512
SEQ = 16
REPO = Path(__file__).resolve().parents[2]


def synthetic_dataset(
    path: Path, *, n_tokens: int, seed: int, band: int = 0, shard_tokens: int = 4000,
    val_tokens: int = 1000, tokenizer: str = "t" * 64, mean_doc: int = 40,
) -> Path:
    """A prepared dataset of random documents whose tokens lie in [4 + 100 * band,
    4 + 100 * (band + 1)), so that a window shows which dataset it came from."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_tokens), ("val", val_tokens)):
        tokens = rng.integers(4 + 100 * band, 4 + 100 * (band + 1), size=n)
        ends = np.unique(np.append(rng.integers(1, n, size=max(1, n // mean_doc)), n))
        tokens[ends - 1] = EOS_ID
        shards = []
        for i, lo in enumerate(range(0, n, shard_tokens)):
            hi = min(n, lo + shard_tokens)
            inside = ends[(ends > lo) & (ends <= hi)] - lo
            name = f"{split}/{i:06d}.bin"
            checksum = write_shard(str(path / name), tokens[lo:hi], inside, vocab_size=VOCAB)
            shards.append({"name": name, "n_tokens": hi - lo, "n_docs": len(inside),
                           "checksum": checksum})
        splits[split] = {"n_tokens": n, "n_docs": len(ends), "shards": shards}
    write_manifest(str(path), {"format": "pretrain-shards", "version": 1, "vocab_size": VOCAB,
                               "tokenizer": {"file": "tokenizer.model",
                                             "fingerprint": tokenizer},
                               "splits": splits})
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mixture")
    sizes = {"books": 6000, "code": 12000, "web": 30000}
    return {name: str(synthetic_dataset(root / name, n_tokens=n, seed=i, band=i))
            for i, (name, n) in enumerate(sizes.items())}


WEIGHTS = {"web": 0.7, "code": 0.2, "books": 0.1}


def make(dirs: dict[str, str], weights: dict[str, float] | None = WEIGHTS,
         **kw: object) -> ShardedWindowLoader:
    args: dict[str, object] = dict(seq_len=SEQ, micro_batch_size=8, vocab_size=VOCAB,
                                   weights=weights)
    return ShardedWindowLoader(dirs, "train", **{**args, **kw})  # type: ignore[arg-type]


def band_of(batch_inputs: np.ndarray) -> np.ndarray:
    """The dataset (band) each row's non-EOS tokens come from."""
    rows = []
    for row in batch_inputs:
        bands = np.unique((row[row != EOS_ID] - 4) // 100)
        assert len(bands) == 1
        rows.append(int(bands[0]))
    return np.array(rows)


def test_proportions_within_1_percent_of_the_weights(dirs: dict[str, str]) -> None:
    loader = make(dirs, micro_batch_size=50)
    shares = []
    for _ in range(2000):  # 100k windows; each source goes through several epochs
        plan, loader.consumed = loader.plan(loader.cursor, loader.consumed)
        loader.cursor += 50
        shares.append(np.bincount(plan.sources, minlength=3))
    totals = np.sum(shares, axis=0) / loader.cursor
    for name, total in zip(loader.names, totals):
        assert abs(total - WEIGHTS[name]) < 0.01 * WEIGHTS[name], (name, total)
    # every single global batch of 50 holds each source within 2 windows of its weight
    expected = np.array([WEIGHTS[n] for n in loader.names]) * 50
    assert np.abs(np.array(shares) - expected).max() <= 2
    assert loader.tokens_consumed() == {n: int(c) * SEQ for n, c in zip(loader.names,
                                                                         loader.consumed)}


def test_rows_hold_the_planned_source_windows(dirs: dict[str, str]) -> None:
    loader = make(dirs, seed=3)
    for _ in range(5):
        batch = loader.next_batch()
        np.testing.assert_array_equal(band_of(batch.inputs.numpy()),
                                      [["books", "code", "web"].index(loader.names[s])
                                       for s in loader.last_rows.sources])
        for row, s, w in zip(batch.inputs, loader.last_rows.sources, loader.last_rows.windows):
            np.testing.assert_array_equal(row.numpy(), loader.sources[s].window(int(w))[:-1])


def test_deterministic_from_the_seed(dirs: dict[str, str]) -> None:
    def plans(seed: int) -> list[tuple[list[int], list[int]]]:
        loader = make(dirs, seed=seed)
        out = []
        for _ in range(6):
            loader.next_batch()
            out.append((loader.last_rows.sources.tolist(), loader.last_rows.windows.tolist()))
        return out

    assert plans(1) == plans(1) and plans(1) != plans(2)
    # a different order of the mapping changes nothing: sources are taken by name
    reordered = {n: dirs[n] for n in reversed(list(dirs))}
    a, b = make(dirs, seed=4), make(reordered, seed=4)
    assert a.next_batch().inputs.equal(b.next_batch().inputs)


@pytest.mark.parametrize("dp_size", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, 2])
def test_same_global_order_for_ranks_and_workers(
    dirs: dict[str, str], dp_size: int, workers: int
) -> None:
    reference = make(dirs, micro_batch_size=2, seed=7)
    ranks = [make(dirs, micro_batch_size=8 // dp_size, dp_rank=r, dp_size=dp_size, seed=7,
                  num_workers=workers, document_masking=True) for r in range(dp_size)]
    for _ in range(5):
        expected = np.concatenate([reference.next_batch().inputs.numpy() for _ in range(4)])
        got = np.concatenate([r.next_batch().inputs.numpy() for r in ranks])
        np.testing.assert_array_equal(got, expected)
    assert all(r.state_dict() == reference.state_dict() for r in ranks)
    for r in ranks:
        r.close()


def test_each_source_window_once_per_its_epoch_across_ranks(dirs: dict[str, str]) -> None:
    ranks = [make(dirs, micro_batch_size=5, dp_rank=r, dp_size=4, seed=5) for r in range(4)]
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    while min(ranks[0].consumed / [s.windows_per_epoch for s in ranks[0].sources]) < 2:
        for r in ranks:
            r.next_batch()
            for s, w in zip(r.last_rows.sources, r.last_rows.windows):
                seen[int(s)].append(int(w))
    for s, source in enumerate(ranks[0].sources):
        n = source.windows_per_epoch
        assert sorted(seen[s][:n]) == sorted(seen[s][n:2 * n]) == list(range(n))
    # epochs go as weight / size: a source with more weight per token repeats sooner
    epochs = ranks[0].metrics()
    size = {s.name: s.windows_per_epoch for s in ranks[0].sources}
    assert epochs["data/epoch/web"] / epochs["data/epoch/books"] == pytest.approx(
        (WEIGHTS["web"] / size["web"]) / (WEIGHTS["books"] / size["books"]), rel=0.02)


def test_new_weights_on_resume_keep_each_source_position(dirs: dict[str, str]) -> None:
    first = make(dirs, weights={"web": 0.5, "code": 0.5, "books": 0.0}, seed=2)
    for _ in range(30):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    before = dict(zip(first.names, first.consumed.tolist()))
    assert before["books"] == 0 and before["web"] > 0  # weight 0: never read

    resumed = make(dirs, weights={"web": 0.2, "code": 0.2, "books": 0.6}, seed=2)
    resumed.load_state_dict(state)
    assert "mixture weights changed" in resumed.notes[0]
    rows: dict[str, list[int]] = {n: [] for n in resumed.names}
    for _ in range(200):
        resumed.next_batch()
        for s, w in zip(resumed.last_rows.sources, resumed.last_rows.windows):
            rows[resumed.names[s]].append(int(w))
    for source in resumed.sources:  # each continues its own seeded order
        k = np.arange(before[source.name], before[source.name] + len(rows[source.name]))
        np.testing.assert_array_equal(rows[source.name], source.window_ids(k, seed=2))
    share = {n: len(r) / 1600 for n, r in rows.items()}
    assert share == pytest.approx({"web": 0.2, "code": 0.2, "books": 0.6}, abs=0.005)


def test_added_or_removed_sources_need_the_override(dirs: dict[str, str]) -> None:
    two = {n: dirs[n] for n in ("web", "code")}
    loader = make(two, weights={"web": 1.0, "code": 1.0})
    for _ in range(3):
        loader.next_batch()
    state = loader.state_dict()
    with pytest.raises(DataError, match=r"sources \['books'\] are new.*allow_data_change"):
        make(dirs).load_state_dict(state)
    with pytest.raises(DataError, match=r"sources \['code'\] are no longer configured"):
        make({"web": dirs["web"]}, weights=None).load_state_dict(state)
    allowed = make(dirs, allow_data_change=True)
    allowed.load_state_dict(state)
    assert dict(zip(allowed.names, allowed.consumed.tolist()))["books"] == 0
    assert allowed.cursor == loader.cursor


def test_eval_windows_mix_by_weight_or_read_one_source(dirs: dict[str, str]) -> None:
    loader = make(dirs, micro_batch_size=20)
    mixed = np.concatenate([b.inputs.numpy() for b in loader.eval_windows(100)])
    counts = np.bincount(band_of(mixed), minlength=3) / len(mixed)  # bands: books, code, web
    assert counts == pytest.approx([0.1, 0.2, 0.7], abs=0.02)
    code = [b.inputs.numpy() for b in loader.eval_windows(40, source="code")]
    assert (band_of(np.concatenate(code)) == 1).all()
    np.testing.assert_array_equal(code[0][0], loader.sources[1].window(0)[:-1])
    with pytest.raises(DataError, match="no source named 'nope'"):
        list(loader.eval_windows(1, source="nope"))


def test_eval_windows_of_a_mixture_are_the_same_on_every_layout(dirs: dict[str, str]) -> None:
    """The real rows of all ranks, in eval-position order, are one list of (source, window)."""
    reference = np.concatenate([b.inputs.numpy() for b in make(dirs, micro_batch_size=37)
                                .eval_windows(37)])
    for dp, mb in ((2, 4), (3, 5)):
        ranks = [list(make(dirs, micro_batch_size=mb, dp_rank=r, dp_size=dp).eval_windows(37))
                 for r in range(dp)]
        assert {len(batches) for batches in ranks} == {-(-37 // (dp * mb))}
        rows = [ranks[r][i].inputs.numpy()[j] for i in range(len(ranks[0])) for r in range(dp)
                for j in range(mb) if (ranks[r][i].targets[j] != IGNORE_INDEX).all()]
        np.testing.assert_array_equal(np.stack(rows), reference)


def test_default_weights_follow_the_sizes(dirs: dict[str, str]) -> None:
    loader = make(dirs, weights=None)
    sizes = np.array([s.n_tokens for s in loader.sources], dtype=float)
    assert [loader.weights[n] for n in loader.names] == pytest.approx(list(sizes / sizes.sum()))


@pytest.mark.parametrize(("weights", "message"), [
    ({"web": -0.1, "code": 1.0, "books": 1.0}, r"weight of 'web' is -0\.1; weights must be"),
    ({"web": 0.0, "code": 0.0, "books": 0.0}, "sum to zero"),
    ({"web": float("nan"), "code": 1.0, "books": 1.0}, "weight of 'web' is nan"),
    ({"web": 1.0, "code": 1.0}, r"give one weight per source"),
])
def test_bad_weights(dirs: dict[str, str], weights: dict[str, float], message: str) -> None:
    with pytest.raises(DataError, match=message):
        make(dirs, weights=weights)


def test_datasets_of_different_tokenizers_do_not_mix(tmp_path: Path,
                                                     dirs: dict[str, str]) -> None:
    other = synthetic_dataset(tmp_path / "other", n_tokens=3000, seed=9, tokenizer="o" * 64)
    with pytest.raises(DataError, match="prepared with different tokenizers"):
        make({"web": dirs["web"], "other": str(other)}, weights=None)


def test_a_source_without_a_window_is_named(tmp_path: Path, dirs: dict[str, str]) -> None:
    tiny = synthetic_dataset(tmp_path / "tiny", n_tokens=10, seed=1, val_tokens=5)
    with pytest.raises(DataError, match=r"train split of .*tiny \(tiny\) holds 10 tokens.*drop "
                                        "the source"):
        make({"web": dirs["web"], "tiny": str(tiny)}, weights=None)


def test_assignment_depends_on_the_position_alone() -> None:
    bounds = slice_bounds([0.5, 0.3, 0.2])
    whole = assign_sources(np.arange(1000), bounds, np.uint64(12345))
    pieces = [assign_sources(np.arange(i, i + 7), bounds, np.uint64(12345))
              for i in range(0, 1000, 7)]
    np.testing.assert_array_equal(np.concatenate(pieces)[:1000], whole)
    assert set(whole.tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(assign_sources(np.arange(50), slice_bounds([1.0]),
                                                 np.uint64(1)), np.zeros(50))


# ---------------------------------------------------------------------------------------------
# the config: data.mix


def test_mix_config_errors_are_named() -> None:
    cases = [
        ({"web": 0.5}, "data.mix.web must be a mapping"),
        (["web"], "data.mix must map source names"),
        ({"web": {"weight": 1.0}}, "needs exactly one of `dir`"),
        ({"web": {"dir": "a", "source": "b"}}, "needs exactly one of `dir`"),
        ({"web": {"dir": "a", "wieght": 1.0}}, "unknown keys ['wieght']"),
        ({"web": {"dir": "a", "weight": "lots"}}, "weight must be a number"),
        ({"web": {"dir": "a", "weight": -1}}, "weights must be finite and >= 0"),
        ({"web": {"dir": "a", "weight": 0}}, "sum to zero"),
    ]
    for mix, message in cases:
        errors = data_config_errors(DataConfig(mix=mix))
        assert len(errors) == 1 and message in errors[0], (mix, errors)
    restart = data_config_errors(DataConfig(restart_positions=True))
    assert "needs data.document_masking=true" in restart[0]
    assert data_config_errors(DataConfig(document_masking=True, restart_positions=True)) == []


@dataclass
class _DataRoot:
    data: DataConfig = field(default_factory=DataConfig)


def compose_data(tmp_path: Path, overrides: list[str]) -> DataConfig:
    """Compose the repo's conf/data presets over the typed DataConfig with Hydra, as
    `conf/train.yaml` does (struct mode included), without the rest of the schema."""
    conf = tmp_path / "conf"
    if not conf.exists():
        shutil.copytree(REPO / "conf" / "data", conf / "data")
        (conf / "root.yaml").write_text("defaults:\n  - data_root\n  - data: builtin\n"
                                        "  - _self_\n")
    ConfigStore.instance().store(name="data_root", node=_DataRoot)
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("root", overrides=overrides)
    data = OmegaConf.to_object(cfg).data
    assert isinstance(data, DataConfig)
    return data


def test_hydra_overrides_express_a_mixture(tmp_path: Path) -> None:
    data = compose_data(tmp_path, [
        "data.mix={web: {dir: /d/web, weight: 0.7}, code: {source: 'c/*.jsonl'}}"])
    assert data.mix == {"web": {"dir": "/d/web", "weight": 0.7},
                        "code": {"source": "c/*.jsonl"}}
    entries = parse_mix(data.mix)
    assert [(e.name, e.weight, e.dir, e.source) for e in entries] == [
        ("code", 1.0, None, "c/*.jsonl"), ("web", 0.7, "/d/web", None)]
    # the preset, a changed weight (a curriculum step on resume) and an added source
    preset = compose_data(tmp_path, ["data=mixture", "data.mix.web.weight=0.5",
                                     "+data.mix.wiki={dir: /d/wiki, weight: 0.1}"])
    assert {e.name: e.weight for e in parse_mix(preset.mix)} == {
        "books": 0.1, "code": 0.2, "web": 0.5, "wiki": 0.1}
    assert preset.document_masking and data_config_errors(preset) == []
    assert compose_data(tmp_path, []).mix is None


def test_ensure_data_and_build_loader_for_a_mixture(tmp_path: Path) -> None:
    docs = make_docs(80)
    tok = train_tokenizer(docs, str(tmp_path / "tok.model"), vocab_size=VOCAB)
    prepare(str(write_jsonl(tmp_path / "web.jsonl", docs[:40])), tok, str(tmp_path / "web"),
            val_fraction=0.1, shard_tokens=2000)
    code = write_jsonl(tmp_path / "code.jsonl", docs[40:])
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), prepare_workers=1, val_fraction=0.1,
                     mix={"web": {"dir": str(tmp_path / "web"), "weight": 0.6},
                          "code": {"source": str(code), "weight": 0.4}},
                     document_masking=True, num_workers=1)
    data = ensure_data(cfg, vocab_size=VOCAB)  # the tokenizer comes from web's directory
    assert set(data.dirs) == {"code", "web"} and data.dirs["web"] == str(tmp_path / "web")
    common = dict(seq_len=SEQ, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0,
                  vocab_size=VOCAB)
    train = build_loader(cfg, data, "train", **common)
    val = build_loader(cfg, data, "val", **common)
    batch = train.next_batch()
    assert batch.doc_ids is not None and set(train.metrics()) == {
        "data/tokens/code", "data/tokens/web", "data/epoch/code", "data/epoch/web"}
    assert train.weights == {"code": 0.4, "web": 0.6} and train.num_workers == 1
    assert len(list(val.eval_windows(8))) == 2 and val.num_workers == 0
    train.close()
    with pytest.raises(DataError, match="needs one shared tokenizer"):
        ensure_data(DataConfig(mix={"code": {"source": str(code)}}), vocab_size=VOCAB)
