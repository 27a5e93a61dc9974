"""Continued pre-training from Hugging Face weights, on one process: the HF tokenizer behind our
Tokenizer interface, init_from's model config and loss parity with transformers at step 0
(plain, sharded and tied safetensors, and through pretrain-import-hf), the base description,
adapters tolerated, and the errors (missing or extra parameters, damaged files, a
contradicting override, a mismatched tokenizer)."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from launch.train import apply_init_from, explicit_keys
from pretrain.config import ModelConfig, TrainConfig
from pretrain.data.hf_tokenizer import HFTokenizer
from pretrain.data.prepare import check_vocab
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import CheckpointError, ConfigError, DataError
from pretrain.models.build import build_model
from pretrain.train.initial import (
    base_tokenizer,
    check_base_tokenizer,
    describe_base,
    load_initial_weights,
    model_config_of,
    resolve_model,
)
from tests.distributed.hf_base import (
    CHAT_TEMPLATE,
    hf_loss,
    index_files,
    make_llama,
    make_tokenizer,
    step0_loss,
)
from tools.import_hf import import_checkpoint

VOCAB = 320


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hf-init")
    tok = make_tokenizer(root / "tok")
    plain = root / "plain"
    model = make_llama(plain, VOCAB + 8, tie=False)  # embeddings padded past the tokenizer
    for f in tok.iterdir():
        (plain / f.name).write_bytes(f.read_bytes())
    sharded = root / "sharded"
    tied = make_llama(sharded, VOCAB, tie=True, shard=True, seed=1)
    return {"root": root, "tok": tok, "plain": plain, "model": model, "sharded": sharded,
            "tied": tied}


# ------------------------------------------------------------------------------- tokenizer


def test_hf_tokenizer_has_the_tokenizer_interface(base: dict) -> None:
    tok = Tokenizer.load(f"hf:{base['tok']}")
    assert isinstance(tok, HFTokenizer)
    public = {n for n, _ in inspect.getmembers(Tokenizer) if not n.startswith("_")}
    assert public <= {n for n in dir(tok) if not n.startswith("_")}
    text = "def f(x):\n\treturn x  # héllo 😀\n"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2 and tok.pad_id == 3
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "x"], eos=True) == [tok.encode(text, eos=True),
                                                       tok.encode("x", eos=True)]
    assert tok.vocab_size == VOCAB and tok.control_ids == [0, 1, 2, 3]
    assert tok.piece_to_id("</s>") == 2 and tok.piece_to_id("<mask>") is None
    assert tok.missing_pieces(["<s>", "<mask>"]) == ["<mask>"]
    with pytest.raises(DataError, match="<mask>"):
        tok.require_specials("mlm")
    assert tok.path == f"hf:{base['tok']}" and tok.chat_template == CHAT_TEMPLATE
    chat = tok.hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|user|>hi</s>"


def test_hf_tokenizer_fingerprint_covers_its_files(base: dict, tmp_path: Path) -> None:
    copy = tmp_path / "tok"
    copy.mkdir()
    for f in base["tok"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    first = Tokenizer.load(f"hf:{base['tok']}").fingerprint
    assert Tokenizer.load(str(copy)).fingerprint == first  # a directory works as hf:DIR
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps(config | {"model_max_length": 7}))
    assert Tokenizer.load(f"hf:{copy}").fingerprint != first


def test_missing_or_damaged_hf_tokenizer_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"hf:{tmp_path / 'none'}: no tokenizer files"):
        Tokenizer.load(f"hf:{tmp_path / 'none'}")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match=f"tokenizer hf:{tmp_path} cannot be loaded") as e:
        Tokenizer.load(f"hf:{tmp_path}")
    assert "\n" not in str(e.value)


def test_vocabulary_larger_than_the_model_is_refused(base: dict) -> None:
    tok = Tokenizer.load(f"hf:{base['tok']}")
    check_vocab(tok, VOCAB + 8)  # a padded embedding matrix is fine
    with pytest.raises(DataError, match=f"vocabulary {VOCAB} but model.vocab_size={VOCAB - 1}"):
        check_vocab(tok, VOCAB - 1)


def test_data_of_another_tokenizer_is_refused(base: dict, tmp_path: Path) -> None:
    other = make_tokenizer(tmp_path / "other", vocab_size=300)
    assert base_tokenizer(str(base["plain"])) == f"hf:{base['plain'].resolve()}"
    check_base_tokenizer(str(base["plain"]), Tokenizer.load(f"hf:{base['tok']}"))
    with pytest.raises(DataError, match=f"tokenizer hf:{other} is not the one of init_from"):
        check_base_tokenizer(str(base["plain"]), Tokenizer.load(f"hf:{other}"))


# ---------------------------------------------------------------------------- init_from


def test_model_config_comes_from_the_hf_config(base: dict) -> None:
    cfg = model_config_of(str(base["plain"]))
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size,
            cfg.ffn_hidden_dim, cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (
        32, 2, 4, 2, VOCAB + 8, 64, 500000.0, 1e-6, False)
    assert model_config_of(str(base["sharded"])).tie_embeddings


@pytest.mark.parametrize("which", ["plain", "sharded"])
def test_step0_loss_equals_transformers(base: dict, which: str) -> None:
    """Untied in one file; tied in several files with model.safetensors.index.json."""
    model = base["model"] if which == "plain" else base["tied"]
    if which == "sharded":
        assert len(index_files(base["sharded"])) > 1
    ref = hf_loss(model, model.config.vocab_size)
    ours = step0_loss(str(base[which]))["loss"]
    assert abs(ours - ref) < 1e-5, (ours, ref)
    # Not a coincidence: the same model randomly initialized has another loss.
    assert abs(step0_loss(str(base[which]), load=False)["loss"] - ref) > 1e-3


def test_imported_checkpoint_is_the_same_base(base: dict, tmp_path: Path) -> None:
    out = tmp_path / "imported"
    ckpt = import_checkpoint(base["plain"], out)
    assert model_config_of(str(out)) == dataclasses.replace(model_config_of(str(base["plain"])),
                                                          name="plain")
    ref = hf_loss(base["model"], VOCAB + 8)
    assert abs(step0_loss(str(out))["loss"] - ref) < 1e-5
    assert abs(step0_loss(str(ckpt))["loss"] - ref) < 1e-5  # the step directory itself
    assert base_tokenizer(str(out)) == f"hf:{(out / 'tokenizer').resolve()}"
    with pytest.raises(FileExistsError):
        import_checkpoint(base["plain"], out)


def test_describe_base(base: dict, tmp_path: Path) -> None:
    hf = describe_base(str(base["plain"]))
    assert hf["kind"] == "hf" and hf["path"] == str(base["plain"].resolve())
    assert describe_base(str(base["plain"])) == hf
    assert describe_base(str(base["sharded"]))["digest"] != hf["digest"]
    import_checkpoint(base["plain"], tmp_path / "imported")
    ours = describe_base(str(tmp_path / "imported"))
    assert ours["kind"] == "pretrain" and ours["path"].endswith("step_00000000")
    assert len(ours["digest"]) == 64 and ours["digest"] != hf["digest"]


def _built(cfg: ModelConfig) -> nn.Module:
    model = build_model(cfg, device="cpu")
    model.tie_weights()
    return model


def test_adapters_may_be_extra_nothing_else(base: dict) -> None:
    cfg = model_config_of(str(base["plain"]))
    model = _built(cfg)
    wq = model.layers["0"].attention.wq
    wq.lora_a = nn.Linear(32, 2, bias=False)
    nn.init.constant_(wq.lora_a.weight, 0.5)
    load_initial_weights([model], str(base["plain"]), cfg)
    ref = base["model"].model.layers[0].self_attn.q_proj.weight
    assert torch.equal(wq.weight, ref)
    assert torch.equal(wq.lora_a.weight, torch.full((2, 32), 0.5))
    model.layers["0"].attention.wk.extra = nn.Linear(32, 2, bias=False)
    with pytest.raises(CheckpointError, match="layers.0.attention.wk.extra.weight"):
        load_initial_weights([model], str(base["plain"]), cfg)


def _copy_without(src: Path, dst: Path, drop: str | None = None, add: str | None = None) -> None:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(3)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_missing_extra_and_damaged_weights_name_the_thing(base: dict, tmp_path: Path) -> None:
    cfg = model_config_of(str(base["plain"]))
    key = "model.layers.1.mlp.down_proj.weight"
    _copy_without(base["plain"], tmp_path / "missing", drop=key)
    with pytest.raises(CheckpointError, match=rf"lacks 1 parameters .*{key} \(ours: "
                                              r"layers.1.feed_forward.w2.weight\)"):
        load_initial_weights([_built(cfg)], str(tmp_path / "missing"), cfg)
    _copy_without(base["plain"], tmp_path / "extra", add="model.layers.0.mlp.gate_proj.bias")
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.gate_proj.bias"):
        load_initial_weights([_built(cfg)], str(tmp_path / "extra"), cfg)
    damaged = tmp_path / "damaged"
    _copy_without(base["plain"], damaged)
    blob = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=f"init_from={damaged}: cannot read") as e:
        load_initial_weights([_built(cfg)], str(damaged), cfg)
    assert "\n" not in str(e.value)


def test_missing_or_unreadable_init_from_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"init_from={tmp_path / 'none'} does not exist"):
        model_config_of(str(tmp_path / "none"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=f"init_from={tmp_path}: config.json cannot"):
        model_config_of(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"no complete checkpoint under {tmp_path}"):
        model_config_of(str(tmp_path))


def test_only_explicit_overrides_can_contradict(base: dict) -> None:
    source = model_config_of(str(base["plain"]))
    preset = ModelConfig(name="cpu", n_layers=6, dim=256)  # defaults the user did not set
    assert resolve_model(source, preset, set(), "X") == source
    mine = dataclasses.replace(preset, name="mine", n_layers=2, max_seq_len=4096)
    assert resolve_model(source, mine, {"name", "n_layers", "max_seq_len"}, "X") == (
        dataclasses.replace(source, name="mine", max_seq_len=4096))  # longer context: no weight
    with pytest.raises(ConfigError, match="model.n_layers=3 contradicts init_from=X, whose "
                                          "model has n_layers=2"):
        resolve_model(source, dataclasses.replace(preset, n_layers=3), {"n_layers"}, "X")
    assert explicit_keys(["model=cpu", "model.n_layers=3", "+model.dim=4", "steps=2",
                          "~model.name"], "model") == {"n_layers", "dim"}


def test_entry_config_takes_the_base_model_and_tokenizer(base: dict, tmp_path: Path) -> None:
    dcfg = OmegaConf.structured(TrainConfig(init_from=str(base["plain"])))
    dcfg.model.name = "mine"  # as Hydra applies the command line before the app runs
    apply_init_from(dcfg, ["model=cpu", "model.name=mine", "steps=3"], tmp_path / "run")
    cfg = OmegaConf.to_object(dcfg)
    assert cfg.model == dataclasses.replace(model_config_of(str(base["plain"])), name="mine")
    assert cfg.data.tokenizer == f"hf:{base['plain'].resolve()}"  # data prepared with it
    with pytest.raises(ConfigError, match="model.dim=64 contradicts"):
        dcfg = OmegaConf.structured(TrainConfig(init_from=str(base["plain"])))
        dcfg.model.dim = 64
        apply_init_from(dcfg, ["model.dim=64"], tmp_path / "run")
    # Resume wins: a run directory with a checkpoint resumes without the base.
    import_checkpoint(base["plain"], tmp_path / "run")
    dcfg = OmegaConf.structured(TrainConfig(init_from=str(tmp_path / "gone")))
    apply_init_from(dcfg, [], tmp_path / "run")
    assert OmegaConf.to_object(dcfg.model).n_layers == 2
