"""Hugging Face interop: our `ModelConfig` + state dict <-> `transformers.LlamaForCausalLM`.

Our model uses HF's rotary convention ("rotate half"), so conversion is a renaming of keys:
wq/wk need no permutation. Only local directories are read or written; nothing is downloaded.

Tokenizer: a SentencePiece BPE model becomes a `tokenizer.json` whose pipeline reproduces
sentencepiece's encoding exactly (its normalization, dummy prefix and byte fallback), loaded by
`AutoTokenizer` as a `PreTrainedTokenizerFast`. We do not declare `LlamaTokenizer`: transformers
5 rebuilds that class's pipeline with a Metaspace pre-tokenizer, which skips sentencepiece's
dummy prefix on text that starts with a space and so encodes such text differently.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pretrain.config import ModelConfig
from pretrain.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from pretrain.models.llama import ffn_hidden_dim

__all__ = [
    "export_hf",
    "from_hf_config",
    "from_hf_state_dict",
    "import_hf",
    "save_hf_tokenizer",
    "spm_to_hf_tokenizer",
    "to_hf_config",
    "to_hf_state_dict",
]

_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_IN_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_OUR_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


# ------------------------------------------------------------------------------------ config


def _rope_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Rotary settings as LlamaConfig takes them: `rope_parameters` (transformers >= 5) or the
    older `rope_theta` + `rope_scaling`."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_factor is not None:
        params.update(
            rope_type="llama3",
            factor=cfg.rope_scaling_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_seq_len,
        )
    from transformers import LlamaConfig

    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        return {"rope_parameters": params}
    theta = params.pop("rope_theta")
    return {"rope_theta": theta, "rope_scaling": params if cfg.rope_scaling_factor else None}


def to_hf_config(cfg: ModelConfig) -> Any:
    """The `transformers.LlamaConfig` of the same architecture."""
    from transformers import LlamaConfig

    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=ffn_hidden_dim(cfg),
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
        head_dim=cfg.dim // cfg.n_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        **_rope_kwargs(cfg),
    )


def _hf_rope(hf_cfg: Any) -> dict[str, Any]:
    """Rotary settings of an HF config, whichever transformers version wrote it."""
    params = getattr(hf_cfg, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        rope = dict(params)
    else:
        rope = dict(getattr(hf_cfg, "rope_scaling", None) or {})
        rope["rope_theta"] = hf_cfg.rope_theta
    rope.setdefault("rope_type", rope.get("type", "default"))
    if rope["rope_type"] not in ("default", "llama3"):
        raise ValueError(f"rope type {rope['rope_type']!r} is not supported; "
                         "pretrain implements plain RoPE and Llama-3.1 ('llama3') scaling")
    return rope


def _check_supported(hf_cfg: Any) -> None:
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    problems = [
        (getattr(hf_cfg, "model_type", "llama") != "llama", f"model_type={hf_cfg.model_type!r}"),
        (hf_cfg.hidden_act != "silu", f"hidden_act={hf_cfg.hidden_act!r}"),
        (getattr(hf_cfg, "attention_bias", False), "attention_bias=True"),
        (getattr(hf_cfg, "mlp_bias", False), "mlp_bias=True"),
        (head_dim * hf_cfg.num_attention_heads != hf_cfg.hidden_size, f"head_dim={head_dim}"),
    ]
    found = [what for bad, what in problems if bad]
    if found:
        raise ValueError(f"unsupported Llama variant ({', '.join(found)}); pretrain's model is a "
                         "plain LLaMA (SwiGLU, no biases, head_dim = hidden_size / heads)")


def from_hf_config(hf_cfg: Any, *, name: str = "hf") -> ModelConfig:
    """Our `ModelConfig` of an HF Llama config; the SwiGLU width becomes `ffn_hidden_dim`."""
    _check_supported(hf_cfg)
    rope = _hf_rope(hf_cfg)
    llama3 = rope["rope_type"] == "llama3"
    defaults = ModelConfig()
    kv = hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads
    return ModelConfig(
        name=name,
        dim=hf_cfg.hidden_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_heads=hf_cfg.num_attention_heads,
        n_kv_heads=None if kv == hf_cfg.num_attention_heads else kv,
        vocab_size=hf_cfg.vocab_size,
        ffn_hidden_dim=hf_cfg.intermediate_size,
        norm_eps=hf_cfg.rms_norm_eps,
        rope_theta=float(rope["rope_theta"]),
        rope_scaling_factor=float(rope["factor"]) if llama3 else None,
        rope_low_freq_factor=rope.get("low_freq_factor", defaults.rope_low_freq_factor),
        rope_high_freq_factor=rope.get("high_freq_factor", defaults.rope_high_freq_factor),
        rope_original_max_seq_len=rope.get("original_max_position_embeddings",
                                           defaults.rope_original_max_seq_len),
        max_seq_len=hf_cfg.max_position_embeddings,
        tie_embeddings=bool(hf_cfg.tie_word_embeddings),
        init_std=hf_cfg.initializer_range,
    )


# ------------------------------------------------------------------------------ state dicts


def _rename(key: str, top: dict[str, str], in_layer: dict[str, str], layer_key: re.Pattern[str],
            layer_prefix: str) -> str:
    if key in top:
        return top[key]
    match = layer_key.fullmatch(key)
    if match is None or match.group(2) not in in_layer:
        raise ValueError(f"unexpected parameter {key!r} in the state dict")
    return f"{layer_prefix}{match.group(1)}.{in_layer[match.group(2)]}.weight"


def _expected_keys(cfg: ModelConfig) -> set[str]:
    per_layer = [f"layers.{i}.{name}.weight" for i in range(cfg.n_layers) for name in _IN_LAYER]
    return set(_TOP_LEVEL) | set(per_layer)


def to_hf_state_dict(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename our (whole, unsharded) state dict to LlamaForCausalLM's keys; same tensors."""
    state_dict = dict(state_dict)
    if cfg.tie_embeddings:
        state_dict.setdefault("output.weight", state_dict["tok_embeddings.weight"])
    missing = _expected_keys(cfg) - set(state_dict)
    if missing:
        raise KeyError(f"state dict lacks {len(missing)} parameters of model {cfg.name!r}, e.g. "
                       f"{sorted(missing)[:3]}; pass the whole model's state dict")
    return {_rename(k, _TOP_LEVEL, _IN_LAYER, _OUR_LAYER_KEY, "model.layers."): v
            for k, v in state_dict.items()}


def from_hf_state_dict(state_dict: dict[str, Tensor], hf_cfg: Any) -> dict[str, Tensor]:
    """Rename a LlamaForCausalLM state dict to ours; same tensors. A tied checkpoint may omit
    lm_head.weight; we fill output.weight with the embedding, as our state dict holds both."""
    top = {v: k for k, v in _TOP_LEVEL.items()}
    in_layer = {v: k for k, v in _IN_LAYER.items()}
    out = {_rename(k, top, in_layer, _HF_LAYER_KEY, "layers."): v
           for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    if hf_cfg.tie_word_embeddings:
        out.setdefault("output.weight", out["tok_embeddings.weight"])
    return out


# --------------------------------------------------------------------------------- tokenizer


def _load_spm_proto(path: str | Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    spec = proto.trainer_spec
    if spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ValueError(f"{path}: only SentencePiece BPE models can be exported")
    ids = (spec.pad_id, spec.unk_id, spec.bos_id, spec.eos_id)
    if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID) or spec.treat_whitespace_as_suffix:
        expected = f"{PAD_ID}/{UNK_ID}/{BOS_ID}/{EOS_ID}"
        raise ValueError(f"{path}: expected pad/unk/bos/eos ids {expected} and whitespace as "
                         f"prefix, got {ids}; retrain it with the pretrain tokenizer tool")
    # sentencepiece extracts user-defined symbols before BPE; a one-character symbol (our "\n")
    # is a plain BPE symbol anyway, longer ones would need that extraction, which we lack.
    long_symbols = [p.piece for p in proto.pieces if p.type == p.USER_DEFINED and len(p.piece) > 1]
    if long_symbols:
        raise ValueError(f"{path}: multi-character user-defined symbols {long_symbols[:3]} "
                         "cannot be exported exactly to a Hugging Face tokenizer")
    return proto


def _bpe_merges(pieces: list[str], mergeable: list[bool]) -> list[tuple[str, str]]:
    """BPE merges equivalent to sentencepiece's: every split of a mergeable piece into two
    pieces, ranked by the merged piece's id (sentencepiece merges higher-scoring, i.e.
    lower-id, pieces first)."""
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges: list[tuple[str, str]] = []
    for piece, ok in zip(pieces, mergeable):
        if not ok:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(splits, key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    return merges


def _spm_normalizer(spec: Any) -> Any:
    """sentencepiece's normalization in sentencepiece's order: character map (NFKC rules),
    whitespace cleanup, dummy-prefix space, spaces to the meta symbol."""
    from tokenizers import Regex, normalizers

    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        # \A and \z: tokenizers' regex engine treats ^ and $ as line anchors.
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    return normalizers.Sequence(steps)


def spm_to_hf_tokenizer(spm_path: str | Path) -> Any:
    """A `tokenizers.Tokenizer` that encodes and decodes exactly like the SentencePiece BPE
    model at `spm_path`, adding BOS in front when special tokens are requested."""
    from tokenizers import AddedToken, Tokenizer, decoders, processors
    from tokenizers.models import BPE

    proto = _load_spm_proto(spm_path)
    pieces = [p.piece for p in proto.pieces]
    normal = [p.type == p.NORMAL for p in proto.pieces]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tok = Tokenizer(BPE(vocab=vocab, merges=_bpe_merges(pieces, normal), unk_token=pieces[UNK_ID],
                        fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback))
    tok.normalizer = _spm_normalizer(proto.normalizer_spec)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    specials = [p.piece for p in proto.pieces if p.type in (p.CONTROL, p.UNKNOWN)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = pieces[BOS_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, BOS_ID)]
    )
    return tok


def save_hf_tokenizer(spm_path: str | Path, out_dir: str | Path, *, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and a copy of the
    SentencePiece model (tokenizer.model) into `out_dir`."""
    out = Path(out_dir)
    spm_to_hf_tokenizer(spm_path).save(str(out / "tokenizer.json"))
    shutil.copyfile(spm_path, out / "tokenizer.model")
    pieces = [p.piece for p in _load_spm_proto(spm_path).pieces]
    special = {"pad_token": pieces[PAD_ID], "unk_token": pieces[UNK_ID],
               "bos_token": pieces[BOS_ID], "eos_token": pieces[EOS_ID]}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True,
              "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": model_max_length}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# ---------------------------------------------------------------------------- export/import


def export_hf(
    state_dict: dict[str, Tensor],
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer_path: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a directory that `AutoModelForCausalLM.from_pretrained(out_dir)` loads
    (config.json, generation_config.json, safetensors weights in `dtype`) and, given a
    SentencePiece model, that `AutoTokenizer.from_pretrained(out_dir)` loads. Returns out_dir."""
    from transformers import LlamaForCausalLM

    if not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype}; export weights as a floating-point type")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_state = to_hf_state_dict(state_dict, cfg)
    hf_state = {k: v.detach().to("cpu", dtype) for k, v in hf_state.items()}
    with torch.device("meta"):  # no allocation and no random init: the weights come from us
        model = LlamaForCausalLM(to_hf_config(cfg)).to(dtype)
    model.load_state_dict(hf_state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(out)
    if tokenizer_path is not None:
        save_hf_tokenizer(tokenizer_path, out, model_max_length=cfg.max_seq_len)
    return out


def _read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(f).items()}
    files = sorted(path.glob("pytorch_model*.bin"))
    if files:
        return {k: v for f in files for k, v in torch.load(f, weights_only=True).items()}
    raise FileNotFoundError(f"{path} holds no *.safetensors or pytorch_model*.bin weights")


def import_hf(path: str | Path) -> tuple[dict[str, Tensor], ModelConfig]:
    """Our state dict and config from a local Hugging Face Llama directory (never the hub)."""
    from transformers import LlamaConfig

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a local Hugging Face model directory "
                                "(no config.json); import_hf does not download from the hub")
    hf_cfg = LlamaConfig.from_pretrained(directory, local_files_only=True)
    cfg = from_hf_config(hf_cfg, name=directory.resolve().name)
    return from_hf_state_dict(_read_weights(directory), hf_cfg), cfg
