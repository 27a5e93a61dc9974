"""Hugging Face interop: our `ModelConfig` + state dict <-> `transformers`, a class per recipe:

    arch=decoder          LlamaForCausalLM
    arch=encoder          post-norm (BERT's recipe): BertForMaskedLM (import also reads
                          BertForPreTraining's masked-LM part and RobertaForMaskedLM);
                          pre-norm (ModernBERT's, every layer global attention):
                          ModernBertForMaskedLM
    arch=encoder_decoder  T5ForConditionalGeneration (mlp=relu with tied embeddings: T5 v1.0;
                          mlp=gated_gelu, untied: T5 v1.1)

Conversion renames keys; the tensors are the same (our rotary convention is HF's "rotate half",
so wq/wk need no permutation), but for ModernBERT's fused projections: its Wqkv is wq, wk, wv
stacked by rows, its Wi w1 (the input) then w3 (the gate). A config the HF class cannot express
(an encoder with RMSNorm, a pre-norm one with learned positions, a T5 with biases, ...) is
refused with a ValueError naming the fields. Only local directories are read or written;
nothing is downloaded.

Tokenizer: a SentencePiece BPE model becomes a `tokenizer.json` whose pipeline reproduces
sentencepiece's encoding exactly (its normalization, dummy prefix and byte fallback), loaded by
`AutoTokenizer` as a `PreTrainedTokenizerFast`. We do not declare `LlamaTokenizer` (or T5's,
BERT's): transformers 5 rebuilds those classes' pipelines (a Metaspace pre-tokenizer, which
skips sentencepiece's dummy prefix on text that starts with a space and so encodes such text
differently). The control pieces (pad, unk, BOS, EOS, `<mask>`, `<extra_id_N>`, `<fim_*>`) are
special tokens: `tok("...")` turns their text into the piece (our `Tokenizer` encodes it as
characters) and decoding with `skip_special_tokens=True` drops them, as sentencepiece does.
`<mask>` and the sentinels take the space before them (`lstrip`): the tokens they replaced in
pre-training began with it. With special tokens requested, the decoder's tokenizer puts BOS in
front (as LlamaTokenizer); the encoder's and T5's append EOS, as every pre-training document
ends with EOS and as T5's tokenizer does. A pair is `A </s> B </s>`, BERT's token type 1 on B
(pre-training used type 0 only, so type 1's embedding is at its init until fine-tuned);
ModernBERT takes no token types.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pretrain.config import ModelConfig
from pretrain.data.hf_tokenizer import HFTokenizer, is_hf_spec, tokenizer_files
from pretrain.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from pretrain.models.llama import ffn_hidden_dim

__all__ = [
    "check_exportable",
    "export_hf",
    "from_hf_config",
    "from_hf_state_dict",
    "hf_class",
    "hf_ignored",
    "import_hf",
    "save_hf_tokenizer",
    "spm_to_hf_tokenizer",
    "to_hf_config",
    "to_hf_key",
    "to_hf_state_dict",
]

_LLAMA, _BERT, _MODERN_BERT, _T5 = ("LlamaForCausalLM", "BertForMaskedLM",
                                     "ModernBertForMaskedLM", "T5ForConditionalGeneration")
HF_CLASSES: dict[str, tuple[str, ...]] = {"decoder": (_LLAMA,), "encoder": (_BERT, _MODERN_BERT),
                                          "encoder_decoder": (_T5,)}
"""The transformers classes each of our families exports to (`hf_class` picks one)."""

# The block options each HF class hard-codes (any other value cannot be expressed).
_RECIPES: dict[str, dict[str, object]] = {
    _LLAMA: dict(norm="rms", norm_position="pre", mlp="swiglu", position="rope",
                 scale_attention=True),
    _BERT: dict(norm="layer", norm_position="post", bias=True, mlp="gelu", position="learned",
                scale_attention=True, tie_embeddings=True),
    # bias either way: ModernBERT's norm_bias, attention_bias, mlp_bias, classifier_bias
    _MODERN_BERT: dict(norm="layer", norm_position="pre", mlp="geglu", position="rope",
                       scale_attention=True, tie_embeddings=True, rope_scaling_factor=None),
    _T5: dict(norm="rms", norm_position="pre", bias=False, position="relative",
              scale_attention=False),
}
_T5_MLP = {"relu": "relu", "gated_gelu": "gated-gelu"}
_T5_ARCHS = ("T5ForConditionalGeneration", "T5WithLMHeadModel")
_BERT_ARCHS = ("BertForMaskedLM", "BertForPreTraining")


def _head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.dim // cfg.n_heads


def hf_class(cfg: ModelConfig) -> str:
    """The transformers class `cfg` exports to: by family, and an encoder by its norm position
    (post: BertForMaskedLM, pre: ModernBertForMaskedLM)."""
    if cfg.arch not in HF_CLASSES:
        raise ValueError(f"model.arch={cfg.arch!r}; Hugging Face export knows "
                         f"{', '.join(HF_CLASSES)}")
    if cfg.arch == "encoder":
        return _MODERN_BERT if cfg.norm_position == "pre" else _BERT
    return HF_CLASSES[cfg.arch][0]


def _inexpressible(cfg: ModelConfig, cls: str) -> list[str]:
    """The fields of `cfg` (as `name=value (why)`) that HF class `cls` cannot express."""
    bad = [f"{k}={getattr(cfg, k)!r} (it needs {v!r})"
           for k, v in _RECIPES[cls].items() if getattr(cfg, k) != v]
    kind = cls.removesuffix("ForMaskedLM").removesuffix("ForConditionalGeneration")
    if cls != _LLAMA and cfg.n_kv_heads is not None and cfg.n_kv_heads != cfg.n_heads:
        bad.append(f"n_kv_heads={cfg.n_kv_heads} ({kind} has no grouped-query attention)")
    if cls in (_BERT, _MODERN_BERT) and cfg.head_dim is not None \
            and cfg.head_dim * cfg.n_heads != cfg.dim:
        bad.append(f"head_dim={cfg.head_dim} ({kind}'s is dim / n_heads)")
    if cls == _T5 and cfg.mlp not in _T5_MLP:
        bad.append(f"mlp={cfg.mlp!r} (T5 has {' or '.join(map(repr, _T5_MLP))})")
    return bad


def check_exportable(cfg: ModelConfig) -> None:
    """ValueError naming every field of `cfg` that its HF class cannot express (an encoder
    that is neither BERT's recipe nor ModernBERT's: the fields that differ from each)."""
    classes = (_BERT, _MODERN_BERT) if cfg.arch == "encoder" else (hf_class(cfg),)
    problems = {cls: _inexpressible(cfg, cls) for cls in classes}
    if all(problems.values()):
        why = " nor as ".join(f"{cls}: model.{', model.'.join(bad)}"
                              for cls, bad in problems.items())
        raise ValueError(f"model {cfg.name!r} (arch={cfg.arch}) cannot be exported as {why}")


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


def _shared_config(cfg: ModelConfig, architecture: str) -> dict[str, Any]:
    """The config fields Llama, BERT and ModernBERT name alike."""
    return dict(architectures=[architecture], vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
                intermediate_size=ffn_hidden_dim(cfg), num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.max_seq_len,
                initializer_range=cfg.init_std, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                eos_token_id=EOS_ID)


def _llama_config(cfg: ModelConfig) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        **_shared_config(cfg, "LlamaForCausalLM"),
        num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
        head_dim=_head_dim(cfg),
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
        **_rope_kwargs(cfg),
    )


def _bert_config(cfg: ModelConfig) -> Any:
    from transformers import BertConfig

    return BertConfig(
        **_shared_config(cfg, "BertForMaskedLM"),
        hidden_act="gelu",  # exact (erf) GELU, ours for mlp=gelu and in the masked-LM head
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.norm_eps,
        tie_word_embeddings=True,
    )


MASK_ID = 4
"""Where pretrain's tokenizers put `<mask>` (the first control piece after the fixed ids)."""


def _modern_bert_config(cfg: ModelConfig, mask_token_id: int | None) -> Any:
    """Every layer global attention with our rotary base; the bias option in every projection
    and LayerNorm, while the output projection always has one (as ours)."""
    from transformers import ModernBertConfig

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if "rope_parameters" in inspect.signature(ModernBertConfig.__init__).parameters:
        layout: dict[str, Any] = {  # transformers >= 5
            "layer_types": ["full_attention"] * cfg.n_layers,
            "rope_parameters": {"full_attention": rope, "sliding_attention": dict(rope)}}
    else:
        layout = {"global_attn_every_n_layers": 1, "global_rope_theta": cfg.rope_theta,
                  "local_rope_theta": cfg.rope_theta}
    return ModernBertConfig(
        **_shared_config(cfg, _MODERN_BERT),
        hidden_activation="gelu",  # exact (erf) GELU: ours for mlp=geglu and in the head
        classifier_activation="gelu",
        norm_eps=cfg.norm_eps,
        norm_bias=cfg.bias,
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
        classifier_bias=cfg.bias,  # the head's dense layer
        decoder_bias=True,
        attention_dropout=0.0,
        embedding_dropout=0.0,
        mlp_dropout=0.0,
        classifier_dropout=0.0,
        sparse_prediction=False,  # logits at every position
        tie_word_embeddings=True,
        cls_token_id=BOS_ID,
        sep_token_id=EOS_ID,
        mask_token_id=mask_token_id,
        **layout,
    )


def _t5_config(cfg: ModelConfig) -> Any:
    from transformers import T5Config

    return T5Config(
        architectures=["T5ForConditionalGeneration"],
        vocab_size=cfg.vocab_size,
        d_model=cfg.dim,
        d_kv=_head_dim(cfg),
        d_ff=ffn_hidden_dim(cfg),
        num_layers=cfg.n_layers,
        num_decoder_layers=cfg.n_decoder_layers or cfg.n_layers,
        num_heads=cfg.n_heads,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        feed_forward_proj=_T5_MLP[cfg.mlp],
        layer_norm_epsilon=cfg.norm_eps,
        # Tied (v1.0) also means the decoder output is scaled by d_model**-0.5; transformers 5
        # reads that from this flag (as `scale_decoder_outputs`) and ties by the weights.
        tie_word_embeddings=cfg.tie_embeddings,
        is_encoder_decoder=True,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,  # T5 starts decoding from pad
        n_positions=cfg.max_seq_len,  # what older T5 configs call it; only our import reads it
    )


def to_hf_config(cfg: ModelConfig, *, mask_token_id: int | None = MASK_ID) -> Any:
    """The transformers config (LlamaConfig, BertConfig, ModernBertConfig or T5Config) of the
    same model; `mask_token_id`: ModernBERT's (the others' configs do not name it)."""
    check_exportable(cfg)
    cls = hf_class(cfg)
    if cls == _MODERN_BERT:
        return _modern_bert_config(cfg, mask_token_id)
    return {_LLAMA: _llama_config, _BERT: _bert_config, _T5: _t5_config}[cls](cfg)


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


def _refuse(kind: str, problems: list[tuple[bool, str]], ours: str) -> None:
    found = [what for bad, what in problems if bad]
    if found:
        raise ValueError(f"unsupported {kind} variant ({', '.join(found)}); {ours}")


def _from_llama(hf_cfg: Any, name: str) -> ModelConfig:
    """The SwiGLU width becomes `ffn_hidden_dim`."""
    attention_bias = bool(getattr(hf_cfg, "attention_bias", False))
    _refuse("Llama", [
        (hf_cfg.hidden_act != "silu", f"hidden_act={hf_cfg.hidden_act!r}"),
        (attention_bias != bool(getattr(hf_cfg, "mlp_bias", False)),
         "attention_bias != mlp_bias"),
    ], "pretrain's decoder is a plain LLaMA (SwiGLU, biases in all projections or none)")
    rope = _hf_rope(hf_cfg)
    llama3 = rope["rope_type"] == "llama3"
    defaults = ModelConfig()
    kv = hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads
    head_dim = getattr(hf_cfg, "head_dim", None)
    return ModelConfig(
        name=name,
        dim=hf_cfg.hidden_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_heads=hf_cfg.num_attention_heads,
        n_kv_heads=None if kv == hf_cfg.num_attention_heads else kv,
        head_dim=None if head_dim in (None, hf_cfg.hidden_size // hf_cfg.num_attention_heads)
        else head_dim,
        bias=attention_bias,
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


def _position_offset(hf_cfg: Any) -> int:
    """Rows of the position table before position 0: RoBERTa numbers positions from
    padding_idx + 1 (for text without padding in front)."""
    return hf_cfg.pad_token_id + 1 if hf_cfg.model_type == "roberta" else 0


def _from_bert(hf_cfg: Any, name: str) -> ModelConfig:
    """BERT and RoBERTa: post-norm LayerNorm blocks with biases, GELU, learned positions."""
    kind = "RoBERTa" if hf_cfg.model_type == "roberta" else "BERT"
    position = getattr(hf_cfg, "position_embedding_type", "absolute")
    _refuse(kind, [
        (hf_cfg.hidden_act != "gelu", f"hidden_act={hf_cfg.hidden_act!r}"),
        (position != "absolute", f"position_embedding_type={position!r}"),
        (bool(getattr(hf_cfg, "is_decoder", False)), "is_decoder=True"),
        (getattr(hf_cfg, "tie_word_embeddings", True) is False, "tie_word_embeddings=False"),
        (hf_cfg.hidden_size % hf_cfg.num_attention_heads != 0,
         f"hidden_size {hf_cfg.hidden_size} not divisible by the heads"),
    ], "pretrain's encoder is BERT's recipe (exact GELU, absolute positions, tied head)")
    return ModelConfig(
        **_encoder_shape(hf_cfg, name),
        norm_position="post",
        norm_eps=hf_cfg.layer_norm_eps,
        bias=True,
        mlp="gelu",
        position="learned",
        type_vocab_size=hf_cfg.type_vocab_size,
        max_seq_len=hf_cfg.max_position_embeddings - _position_offset(hf_cfg),
    )


def _encoder_shape(hf_cfg: Any, name: str) -> dict[str, Any]:
    """The ModelConfig fields BERT's and ModernBERT's configs give alike."""
    return dict(name=name, arch="encoder", dim=hf_cfg.hidden_size,
                n_layers=hf_cfg.num_hidden_layers, n_heads=hf_cfg.num_attention_heads,
                vocab_size=hf_cfg.vocab_size, ffn_hidden_dim=hf_cfg.intermediate_size,
                norm="layer", tie_embeddings=True, init_std=hf_cfg.initializer_range)


def _modern_bert_layout(hf_cfg: Any) -> tuple[list[str], dict[str, Any]]:
    """Each layer's attention kind and the global layers' rotary settings, whichever
    transformers version wrote the config (5: `layer_types`, `rope_parameters`; 4:
    `global_attn_every_n_layers`, `global_rope_theta`)."""
    kinds = getattr(hf_cfg, "layer_types", None)
    if not kinds:
        every = getattr(hf_cfg, "global_attn_every_n_layers", 3)
        kinds = ["full_attention" if i % every == 0 else "sliding_attention"
                 for i in range(hf_cfg.num_hidden_layers)]
    params = getattr(hf_cfg, "rope_parameters", None)
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        rope = dict(params["full_attention"])
    else:
        rope = {"rope_theta": hf_cfg.global_rope_theta}
    rope.setdefault("rope_type", rope.get("type", "default"))
    return list(kinds), rope


def _from_modern_bert(hf_cfg: Any, name: str) -> ModelConfig:
    """ModernBERT with global attention in every layer: pre-norm LayerNorm, GeGLU, RoPE, the
    bias option the same in every projection and norm."""
    kinds, rope = _modern_bert_layout(hf_cfg)
    local = [i for i, kind in enumerate(kinds) if kind != "full_attention"]
    bias = bool(hf_cfg.attention_bias)
    biases = {k: bool(getattr(hf_cfg, k)) for k in ("norm_bias", "mlp_bias", "classifier_bias")}
    _refuse("ModernBERT", [
        (bool(local), f"local (sliding-window) attention in layers {local}"),
        (rope["rope_type"] != "default", f"rope type {rope['rope_type']!r}"),
        (hf_cfg.hidden_activation != "gelu", f"hidden_activation={hf_cfg.hidden_activation!r}"),
        (hf_cfg.classifier_activation != "gelu",
         f"classifier_activation={hf_cfg.classifier_activation!r}"),
        *((b != bias, f"{k}={b} with attention_bias={bias}") for k, b in biases.items()),
        (not hf_cfg.decoder_bias, "decoder_bias=False"),
        (getattr(hf_cfg, "tie_word_embeddings", True) is False, "tie_word_embeddings=False"),
        (hf_cfg.hidden_size % hf_cfg.num_attention_heads != 0,
         f"hidden_size {hf_cfg.hidden_size} not divisible by the heads"),
    ], "pretrain's pre-norm encoder is ModernBERT with every layer global attention, exact "
       "GELU, biases in all projections and norms or none, a tied head with a bias")
    return ModelConfig(
        **_encoder_shape(hf_cfg, name),
        norm_position="pre",
        norm_eps=hf_cfg.norm_eps,
        bias=bias,
        mlp="geglu",
        position="rope",
        rope_theta=float(rope["rope_theta"]),
        max_seq_len=hf_cfg.max_position_embeddings,
    )


def _t5_scales_output(hf_cfg: Any) -> bool:
    """Whether the decoder output is scaled by d_model**-0.5 (T5 v1.0): transformers 5 keeps
    it as `scale_decoder_outputs` (its `tie_word_embeddings` is always true), 4 as the tie."""
    return bool(getattr(hf_cfg, "scale_decoder_outputs", hf_cfg.tie_word_embeddings))


def _from_t5(hf_cfg: Any, name: str) -> ModelConfig:
    mlp = {v: k for k, v in _T5_MLP.items()}.get(hf_cfg.feed_forward_proj)
    _refuse("T5", [(mlp is None, f"feed_forward_proj={hf_cfg.feed_forward_proj!r}")],
                   f"pretrain's encoder-decoder has {' or '.join(_T5_MLP.values())}")
    return ModelConfig(
        name=name,
        arch="encoder_decoder",
        dim=hf_cfg.d_model,
        n_layers=hf_cfg.num_layers,
        n_decoder_layers=hf_cfg.num_decoder_layers,
        n_heads=hf_cfg.num_heads,
        head_dim=hf_cfg.d_kv,
        vocab_size=hf_cfg.vocab_size,
        ffn_hidden_dim=hf_cfg.d_ff,
        norm="rms",
        norm_eps=hf_cfg.layer_norm_epsilon,
        mlp=mlp,
        position="relative",
        scale_attention=False,
        relative_buckets=hf_cfg.relative_attention_num_buckets,
        relative_max_distance=hf_cfg.relative_attention_max_distance,
        max_seq_len=getattr(hf_cfg, "n_positions", None) or 512,  # T5's pre-training length
        tie_embeddings=_t5_scales_output(hf_cfg),
    )


_FROM_HF = {"llama": _from_llama, "bert": _from_bert, "roberta": _from_bert,
            "modernbert": _from_modern_bert, "t5": _from_t5}


def from_hf_config(hf_cfg: Any, *, name: str = "hf") -> ModelConfig:
    """Our `ModelConfig` of a transformers Llama, BERT, RoBERTa, ModernBERT or T5 config;
    ValueError for a variant our models do not implement."""
    model_type = getattr(hf_cfg, "model_type", "llama")
    if model_type not in _FROM_HF:
        raise ValueError(f"model_type={model_type!r} is not supported; pretrain imports "
                         f"{', '.join(_FROM_HF)}")
    return _FROM_HF[model_type](hf_cfg, name)


# ------------------------------------------------------------------------------ state dicts


@dataclass(frozen=True)
class _Names:
    """Our parameter names and an HF class's, for one family, as module paths (a parameter's
    name less its last part, `weight` or `bias`): top-level modules, and the modules inside the
    blocks of each stack, keyed by (our stack, HF's prefix of block i)."""

    top: dict[str, str]
    stacks: dict[tuple[str, str], dict[str, str]]
    aliases: dict[str, str]
    """HF names of tensors that are another HF name's (tied), as alias -> that name."""
    ignored: tuple[str, ...] = ()
    """Substrings of HF names that hold nothing we keep (buffers, heads we lack)."""

    def reversed(self) -> _Names:
        return _Names({v: k for k, v in self.top.items()},
                      {(hf, ours): {v: k for k, v in names.items()}
                       for (ours, hf), names in self.stacks.items()}, {})

    def rename(self, key: str) -> str:
        """`key` in the other naming (ValueError for a name it does not know)."""
        module, _, param = key.rpartition(".")
        if module in self.top:
            return f"{self.top[module]}.{param}"
        for (src, dst), names in self.stacks.items():
            index, _, rest = key.removeprefix(src).partition(".")
            inner = rest.rpartition(".")[0]
            if key.startswith(src) and index.isdigit() and inner in names:
                return f"{dst}{index}.{names[inner]}.{param}"
        raise ValueError(f"unexpected parameter {key!r} in the state dict")


_LLAMA_BLOCK = {
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
_BERT_BLOCK = {
    "attention.wq": "attention.self.query",
    "attention.wk": "attention.self.key",
    "attention.wv": "attention.self.value",
    "attention.wo": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "feed_forward.w1": "intermediate.dense",
    "feed_forward.w2": "output.dense",
    "ffn_norm": "output.LayerNorm",
}

_MODERN_BERT_BLOCK = {  # wqkv and w13: our matrices fused as HF's (`_FUSED`)
    "attention.wqkv": "attn.Wqkv",
    "attention.wo": "attn.Wo",
    "attention_norm": "attn_norm",  # absent in layer 0 (its input is the normalized embeddings)
    "feed_forward.w13": "mlp.Wi",
    "feed_forward.w2": "mlp.Wo",
    "ffn_norm": "mlp_norm",
}
_FUSED = {"attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
          "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3")}
"""ModernBERT's fused projections: our matrices (and biases) stacked by output rows, in order
(its MLP computes act(input) * gate from the halves of Wi: input w1, gate w3)."""
_BLOCK_KEY = re.compile(r"(layers\.\d+\.)(.+)\.(weight|bias)")


def _fuse(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our block matrices stacked as `_FUSED` names them (other tensors as they are); for a
    state dict `_check_state_dict` passed, which holds every part."""
    parts: dict[str, dict[str, Tensor]] = {}
    out = {}
    for key, value in state_dict.items():
        m = _BLOCK_KEY.fullmatch(key)
        fused = next((f for f, names in _FUSED.items() if m and m[2] in names), None)
        if fused is None:
            out[key] = value
        else:
            parts.setdefault(f"{m[1]}{fused}.{m[3]}", {})[m[2]] = value
    for key, found in parts.items():
        out[key] = torch.cat([found[n] for n in _FUSED[_BLOCK_KEY.fullmatch(key)[2]]])
    return out


def _split(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """`_fuse` undone: each fused tensor cut into our matrices (copies, not views of it)."""
    out = {}
    for key, value in state_dict.items():
        m = _BLOCK_KEY.fullmatch(key)
        if m is None or m[2] not in _FUSED:
            out[key] = value
            continue
        names = _FUSED[m[2]]
        if value.shape[0] % len(names):
            raise ValueError(f"{key} has {value.shape[0]} rows, not {len(names)} equal parts")
        for name, part in zip(names, value.chunk(len(names))):
            out[f"{m[1]}{name}.{m[3]}"] = part.clone()
    return out


def _t5_block(decoder: bool, gated: bool) -> dict[str, str]:
    ffn = "layer.2" if decoder else "layer.1"
    names = {f"attention.w{x}": f"layer.0.SelfAttention.{x}" for x in "qkvo"}
    names["attention_norm"] = "layer.0.layer_norm"
    if decoder:
        names |= {f"cross_attention.w{x}": f"layer.1.EncDecAttention.{x}" for x in "qkvo"}
        names["cross_attention_norm"] = "layer.1.layer_norm"
    if gated:  # v1.1: act(wi_0 x) * wi_1 x, ours act(w1 x) * w3 x
        names |= {"feed_forward.w1": f"{ffn}.DenseReluDense.wi_0",
                  "feed_forward.w3": f"{ffn}.DenseReluDense.wi_1"}
    else:
        names["feed_forward.w1"] = f"{ffn}.DenseReluDense.wi"
    names["feed_forward.w2"] = f"{ffn}.DenseReluDense.wo"
    names["ffn_norm"] = f"{ffn}.layer_norm"
    return names


def _names(arch: str, *, gated: bool = True, roberta: bool = False,
           modern: bool = False) -> _Names:
    """Our names -> the HF class's, for family `arch` (T5: `gated` MLP; encoder: RoBERTa's or
    ModernBERT's, the latter with the block matrices `_fuse`d)."""
    if arch == "encoder" and modern:
        return _Names(
            {"tok_embeddings": "model.embeddings.tok_embeddings",
             "embed_norm": "model.embeddings.norm", "norm": "model.final_norm",
             "head_dense": "head.dense", "head_norm": "head.norm", "output": "decoder"},
            {("layers.", "model.layers."): _MODERN_BERT_BLOCK}, {},
            ignored=("rotary_emb.",))
    if arch == "decoder":
        return _Names({"tok_embeddings": "model.embed_tokens", "norm": "model.norm",
                       "output": "lm_head"},
                      {("layers.", "model.layers."): _LLAMA_BLOCK}, {},
                      ignored=("rotary_emb.inv_freq",))
    if arch == "encoder":
        base, head = ("roberta", "lm_head") if roberta else ("bert", "cls.predictions")
        transform = "" if roberta else ".transform"
        head_norm = "layer_norm" if roberta else "LayerNorm"
        return _Names(
            {"tok_embeddings": f"{base}.embeddings.word_embeddings",
             "pos_embeddings": f"{base}.embeddings.position_embeddings",
             "type_embeddings": f"{base}.embeddings.token_type_embeddings",
             "embed_norm": f"{base}.embeddings.LayerNorm",
             "head_dense": f"{head}{transform}.dense",
             "head_norm": f"{head}{transform}.{head_norm}",
             "output": f"{head}.decoder"},
            {("layers.", f"{base}.encoder.layer."): _BERT_BLOCK},
            # The output bias is a parameter of the head that the decoder Linear shares.
            {f"{head}.bias": f"{head}.decoder.bias"},
            ignored=("embeddings.position_ids", "embeddings.token_type_ids", f"{base}.pooler.",
                     "cls.seq_relationship."),
        )
    return _Names(
        {"tok_embeddings": "shared",
         "relative_bias": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
         "norm": "encoder.final_layer_norm",
         "decoder_relative_bias": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias",
         "decoder_norm": "decoder.final_layer_norm",
         "output": "lm_head"},
        {("layers.", "encoder.block."): _t5_block(False, gated),
         ("decoder_layers.", "decoder.block."): _t5_block(True, gated)},
        {"encoder.embed_tokens.weight": "shared.weight",
         "decoder.embed_tokens.weight": "shared.weight"},
        ignored=("EncDecAttention.relative_attention_bias",),  # never used by transformers
    )


def _decoder_names(cfg: ModelConfig) -> _Names:
    if hf_class(cfg) != _LLAMA:
        raise ValueError(f"model {cfg.name!r} (arch={cfg.arch}) has no per-parameter HF names; "
                         "only the decoder (LlamaForCausalLM) loads sharded")
    return _names(cfg.arch)


def to_hf_key(key: str, cfg: ModelConfig) -> str:
    """The LlamaForCausalLM name of our parameter `key` (`layers.0.attention.wq.weight` ->
    `model.layers.0.self_attn.q_proj.weight`): the one mapping, for loading by name."""
    return _decoder_names(cfg).rename(key)


def hf_ignored(cfg: ModelConfig) -> tuple[str, ...]:
    """Substrings of LlamaForCausalLM names that hold nothing we keep (buffers)."""
    return _decoder_names(cfg).ignored


def _expected(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Names and shapes of the state dict of our model of `cfg` (built on meta: no memory)."""
    from pretrain.models.build import build_model

    return {k: v.shape for k, v in build_model(cfg, device="meta").state_dict().items()}


def _check_state_dict(state_dict: dict[str, Tensor], cfg: ModelConfig) -> None:
    """KeyError for missing parameters, ValueError for unknown ones or other shapes."""
    expected = _expected(cfg)
    missing = sorted(expected.keys() - state_dict.keys())
    if missing:
        raise KeyError(f"state dict lacks {len(missing)} parameters of model {cfg.name!r}, e.g. "
                       f"{missing[:3]}; pass the whole model's state dict")
    unexpected = sorted(state_dict.keys() - expected.keys())
    if unexpected:
        raise ValueError(f"unexpected parameter {unexpected[0]!r} in the state dict "
                         f"({len(unexpected)} not in model {cfg.name!r})")
    wrong = [k for k in expected if state_dict[k].shape != expected[k]]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{k} has shape {tuple(state_dict[k].shape)}, model {cfg.name!r} "
                         f"{tuple(expected[k])} ({len(wrong)} parameters differ)")


def _tie_output(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our state dict names a tied matrix twice; a checkpoint may hold it once."""
    state_dict = dict(state_dict)
    if cfg.tie_embeddings and "tok_embeddings.weight" in state_dict:
        state_dict.setdefault("output.weight", state_dict["tok_embeddings.weight"])
    return state_dict


def to_hf_state_dict(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename our (whole, unsharded) state dict to the keys of the model's HF class (tied
    tensors under each of their names); same tensors, but for ModernBERT's fused matrices."""
    check_exportable(cfg)
    state_dict = _tie_output(state_dict, cfg)
    _check_state_dict(state_dict, cfg)
    modern = hf_class(cfg) == _MODERN_BERT
    names = _names(cfg.arch, gated=cfg.mlp == "gated_gelu", modern=modern)
    out = {names.rename(k): v for k, v in (_fuse(state_dict) if modern else state_dict).items()}
    return out | {alias: out[source] for alias, source in names.aliases.items()}


def from_hf_state_dict(state_dict: dict[str, Tensor], hf_cfg: Any) -> dict[str, Tensor]:
    """Rename an HF state dict (Llama, BERT, RoBERTa, ModernBERT, T5) to ours; same tensors,
    but for ModernBERT's fused matrices, which are split, and RoBERTa's position table, whose
    rows before position 0 are dropped. A tied checkpoint may omit the output matrix; we fill
    output.weight with the embedding, as our state dict holds both."""
    cfg = from_hf_config(hf_cfg)
    roberta = getattr(hf_cfg, "model_type", None) == "roberta"
    modern = hf_class(cfg) == _MODERN_BERT
    names = _names(cfg.arch, gated=cfg.mlp == "gated_gelu", roberta=roberta, modern=modern)
    hf = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                   "LayerNorm.bias"): v
          for k, v in state_dict.items() if not any(s in k for s in names.ignored)}
    for alias, source in names.aliases.items():
        if alias in hf:
            hf.setdefault(source, hf[alias])
            del hf[alias]
    back = names.reversed()
    out = {back.rename(k): v for k, v in hf.items()}
    if modern:
        out = _split(out)
    if cfg.tie_embeddings and "output.weight" in out and "tok_embeddings.weight" in out:
        if not torch.equal(out["output.weight"], out["tok_embeddings.weight"]):
            raise ValueError("the checkpoint declares tied embeddings (the output projection "
                             "is the embedding) but holds a different output matrix")
    if "pos_embeddings.weight" in out and _position_offset(hf_cfg):
        out["pos_embeddings.weight"] = out["pos_embeddings.weight"][_position_offset(hf_cfg):]
    return _tie_output(out, cfg)


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


_MASK = "<mask>"
_STRIP_LEFT = re.compile(r"<mask>|<extra_id_\d+>")
"""Control pieces that stand for removed tokens (the mask, T5's sentinels), which began with
the space before them."""



def spm_to_hf_tokenizer(spm_path: str | Path, *, arch: str = "decoder") -> Any:
    """A `tokenizers.Tokenizer` that encodes and decodes exactly like the SentencePiece BPE
    model at `spm_path`; with special tokens requested it adds BOS in front (arch=decoder) or
    EOS after the text (encoder, encoder_decoder)."""
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
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False,
                                       lstrip=bool(_STRIP_LEFT.fullmatch(s))) for s in specials])
    bos, eos = pieces[BOS_ID], pieces[EOS_ID]
    if arch == "decoder":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, BOS_ID)])
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1",
            special_tokens=[(eos, EOS_ID)])
    return tok


def save_hf_tokenizer(spm_path: str | Path, out_dir: str | Path, *, model_max_length: int,
                      arch: str = "decoder", token_types: bool | None = None) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and a copy of the
    SentencePiece model (tokenizer.model) into `out_dir`, for a model of family `arch`:
    `<mask>` is the encoder's mask token; the other control pieces (T5's sentinels, the FIM
    pieces) are additional special tokens. `token_types`: whether the tokenizer returns
    token_type_ids (default: for an encoder, as BERT takes them; ModernBERT does not)."""
    if arch not in HF_CLASSES:
        raise ValueError(f"arch={arch!r}; one of {', '.join(HF_CLASSES)}")
    out = Path(out_dir)
    spm_to_hf_tokenizer(spm_path, arch=arch).save(str(out / "tokenizer.json"))
    shutil.copyfile(spm_path, out / "tokenizer.model")
    proto = _load_spm_proto(spm_path)
    pieces = [p.piece for p in proto.pieces]
    special: dict[str, Any] = {"pad_token": pieces[PAD_ID], "unk_token": pieces[UNK_ID],
                               "bos_token": pieces[BOS_ID], "eos_token": pieces[EOS_ID]}
    control = [p.piece for p in proto.pieces if p.type == p.CONTROL and p.piece not in
               special.values()]
    if arch == "encoder" and _MASK in control:
        special["mask_token"] = _MASK
        control.remove(_MASK)
    if arch == "encoder_decoder":  # T5's own lists its sentinels first, in order
        control.sort(key=lambda piece: not piece.startswith("<extra_id_"))
    if control:
        special["additional_special_tokens"] = control
    decoder = arch == "decoder"
    if token_types is None:
        token_types = arch == "encoder"
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
              "add_bos_token": decoder, "add_eos_token": not decoder,
              "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
              # BERT's token types are 0 for a text, 1 for a pair's second
              "model_input_names": ["input_ids", *(["token_type_ids"] if token_types else []),
                                    "attention_mask"]}
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
    """Write a directory that transformers' `from_pretrained(out_dir)` loads as the model's
    class (`hf_class`: config.json, generation_config.json for the generating ones,
    safetensors weights in `dtype`) and, given a tokenizer, one that
    `AutoTokenizer.from_pretrained(out_dir)` loads (a SentencePiece model converted, or a
    transformers tokenizer given as 'hf:DIR' copied as it is, its special ids in the config;
    a decoder's generation config then stops at its chat template's end-of-turn ids too, see
    `_generation_config`). Checks everything before writing anything. Returns out_dir."""
    import transformers

    if not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype}; export weights as a floating-point type")
    check_exportable(cfg)
    mask_token_id: int | None = MASK_ID
    hf_tok = None
    if tokenizer_path is not None and is_hf_spec(tokenizer_path):  # a transformers tokenizer
        hf_tok = HFTokenizer.load(tokenizer_path)
        mask_token_id = hf_tok.hf.mask_token_id
    elif tokenizer_path is not None:  # a tokenizer we cannot export fails before any write
        pieces = [p.piece for p in _load_spm_proto(tokenizer_path).pieces]
        mask_token_id = pieces.index(_MASK) if _MASK in pieces else None
    cls = hf_class(cfg)
    hf_cfg = to_hf_config(cfg, mask_token_id=mask_token_id)
    if hf_tok is not None:  # its special ids, not the fixed ones of our SentencePiece models
        hf_cfg.bos_token_id, hf_cfg.eos_token_id = hf_tok.bos_id, hf_tok.eos_id
        hf_cfg.pad_token_id = hf_tok.hf.pad_token_id
    hf_state = {k: v.detach().to("cpu", dtype)
                for k, v in to_hf_state_dict(state_dict, cfg).items()}
    with torch.device("meta"):  # no allocation and no random init: the weights come from us
        model = getattr(transformers, cls)(hf_cfg).to(dtype)
    model.load_state_dict(hf_state, strict=True, assign=True)
    _retie(model, cfg)
    if hf_tok is not None and cls == _LLAMA:
        model.generation_config = _generation_config(model.generation_config, hf_tok)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    # What older transformers versions read: transformers 5 writes tie_word_embeddings=true
    # for every T5 (it keeps the meaning in scale_decoder_outputs), and ModernBERT's layer
    # kinds and rotary bases as `layer_types` and `rope_parameters`, which 4 does not know.
    if cls == _T5:
        _update_config(out, tie_word_embeddings=cfg.tie_embeddings)
    if cls == _MODERN_BERT:
        _update_config(out, global_attn_every_n_layers=1, global_rope_theta=cfg.rope_theta,
                       local_rope_theta=cfg.rope_theta)
    if hf_tok is not None:  # the very files it was loaded from
        for path in tokenizer_files(hf_tok.directory):
            shutil.copyfile(path, out / path.name)
    elif tokenizer_path is not None:
        save_hf_tokenizer(tokenizer_path, out, model_max_length=cfg.max_seq_len, arch=cfg.arch,
                          token_types=cls == _BERT)
    return out


def _generation_config(own: Any, hf_tok: HFTokenizer) -> Any:
    """The generation config of a decoder with a transformers tokenizer: the base's own
    generation_config.json where the tokenizer's directory holds one (a run from an HF
    init_from reads its tokenizer there: sampling defaults, eos lists carry over), else `own`;
    its eos_token_id lists EOS and the chat template's end-of-turn ids, so that `generate`
    stops where a fine-tuned answer ends."""
    from transformers import GenerationConfig

    from pretrain.data.sft import chat_template

    config = own
    if (Path(hf_tok.directory) / "generation_config.json").is_file():
        config = GenerationConfig.from_pretrained(hf_tok.directory, local_files_only=True)
    eos = config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    ids = list(dict.fromkeys([*ids, *chat_template(hf_tok).stop_ids()]))
    config.eos_token_id = ids[0] if len(ids) == 1 else ids
    return config


def _update_config(out: Path, **fields: Any) -> None:
    path = out / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps(saved | fields, indent=2, sort_keys=True) + "\n")


def _retie(model: Any, cfg: ModelConfig) -> None:
    """`load_state_dict(assign=True)` gives every name its own Parameter; share them again
    where the HF class ties them, so that the matrix is saved once."""
    cls = hf_class(cfg)
    if cls == _LLAMA:
        if cfg.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
    elif cls == _BERT:
        head = model.cls.predictions
        head.decoder.weight = model.bert.embeddings.word_embeddings.weight
        head.decoder.bias = head.bias
    elif cls == _MODERN_BERT:
        model.decoder.weight = model.model.embeddings.tok_embeddings.weight
    else:
        model.encoder.embed_tokens.weight = model.shared.weight
        model.decoder.embed_tokens.weight = model.shared.weight
        if cfg.tie_embeddings:
            model.lm_head.weight = model.shared.weight


def _read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(f).items()}
    files = sorted(path.glob("pytorch_model*.bin"))
    if files:
        return {k: v for f in files for k, v in torch.load(f, weights_only=True).items()}
    raise FileNotFoundError(f"{path} holds no *.safetensors or pytorch_model*.bin weights")


_ARCHITECTURES = {"llama": ("LlamaForCausalLM",), "bert": _BERT_ARCHS,
                  "roberta": ("RobertaForMaskedLM",), "modernbert": (_MODERN_BERT,),
                  "t5": _T5_ARCHS}
"""The model classes whose checkpoints hold every weight our model of that type needs."""


def import_hf(path: str | Path) -> tuple[dict[str, Tensor], ModelConfig]:
    """Our state dict and config from a local Hugging Face directory of LlamaForCausalLM,
    BertForMaskedLM (or BertForPreTraining: its masked-LM part), RobertaForMaskedLM,
    ModernBertForMaskedLM (global attention in every layer) or T5ForConditionalGeneration;
    never the hub. A RoBERTa model numbers positions from padding_idx + 1: ours from 0, which
    gives its results for text without padding in front."""
    from transformers import AutoConfig

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a local Hugging Face model directory "
                                "(no config.json); import_hf does not download from the hub")
    hf_cfg = AutoConfig.from_pretrained(directory, local_files_only=True)
    known = _ARCHITECTURES.get(hf_cfg.model_type, ())
    declared = getattr(hf_cfg, "architectures", None) or []
    if known and declared and not set(declared) & set(known):
        raise ValueError(f"{directory} holds a {'/'.join(declared)}; import_hf reads "
                         f"{' or '.join(known)} (the weights of the whole model with its head)")
    cfg = from_hf_config(hf_cfg, name=directory.resolve().name)
    state_dict = from_hf_state_dict(_read_weights(directory), hf_cfg)
    _check_state_dict(state_dict, cfg)
    return state_dict, cfg
