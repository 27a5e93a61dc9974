"""The lm-eval-harness model type `pretrain`: our checkpoints (or a Hugging Face LLaMA directory)
scored by the harness with the same code as `pretrain-eval` (`pretrain.eval.downstream`).

lm-eval finds model types in its registry, which this module fills when imported (lm-eval
0.4 has no plugin entry points), so import it before calling the harness:

    import lm_eval
    import pretrain.eval.harness  # registers model="pretrain"
    lm_eval.simple_evaluate(model="pretrain", model_args="checkpoint=runs/NAME,batch_size=16",
                            tasks=["hellaswag"])

or use `pretrain-lm-eval`, which imports it and passes its arguments to lm-eval's own command
line. model_args: checkpoint (required), batch_size, tokenizer, max_length (default: the run's
seq_len, or the HF model's max_position_embeddings). Needs the `eval` extra (lm-eval); nothing
else in `pretrain` imports this module.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import (
    get_rolling_token_windows,
    make_disjoint_window,
    simple_parse_args_string,
)

from pretrain.eval.downstream import (
    encode_pair,
    load_for_eval,
    loglikelihoods,
    model_forward,
    prefix_id,
)
from pretrain.eval.generate import generate_batch

__all__ = ["PretrainLM"]


def _int_or(value: Any, default: int) -> int:
    """lm-eval passes batch_size as an int, a string, or 'auto' (meaning: our default)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


@register_model("pretrain")
class PretrainLM(LM):
    """Zero-shot log-likelihoods, rolling log-likelihoods and greedy generation of one model
    on one process (CPU, or `device`)."""

    def __init__(self, checkpoint: str, batch_size: int | str = 16, tokenizer: str | None = None,
                 max_length: int | str | None = None, device: str | None = None,
                 **_: Any) -> None:
        super().__init__()
        model, self.tok, window = load_for_eval(checkpoint, tokenizer)
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line defaults to cuda; its own HF model falls back the same way
            print(f"note: device={device} but CUDA is not available; using the CPU")
            device = "cpu"
        self.device_ = torch.device(device or "cpu")
        self.model = model.to(self.device_)
        self.batch_size = _int_or(batch_size, 16)
        self.max_length = _int_or(max_length, window)
        self.forward = model_forward(self.model)

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict[str, Any] | None = None) -> PretrainLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict[str, Any] | None = None) -> PretrainLM:
        """model_args win over the harness's own flags (its --batch_size, --device) where both
        name a value; lm-eval's default would pass both and fail."""
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    def _scores(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        scored = loglikelihoods(self.forward, pairs, max_len=self.max_length,
                                batch_size=self.batch_size, pad_id=max(self.tok.pad_id, 0),
                                device=self.device_)
        return [(s.loglik, s.greedy) for s in scored]

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        return self._scores([encode_pair(self.tok, *r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        """The whole text's log-likelihood, in windows of `max_length` that do not overlap
        (lm-eval's `get_rolling_token_windows` with context 1), after the prefix token."""
        out = []
        for r in requests:
            ids = self.tok.encode(r.args[0])
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                ids, prefix_id(self.tok), self.max_length, 1)]
            out.append(sum(ll for ll, _ in self._scores(windows)))
        return out

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Greedy continuation (sampling options are ignored), cut at the first `until`
        string, at most `max_gen_toks` tokens (default 256); the context keeps its last tokens
        that leave room for them."""
        out = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            budget = min(self.max_length, self.model.config.max_seq_len) - max_new
            if budget < 1:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for the context in "
                                 f"the window of {self.max_length}")
            ids = [prefix_id(self.tok), *self.tok.encode(context)][-budget:]
            [new] = generate_batch(self.model, [ids], max_new_tokens=max_new, temperature=0.0,
                                   eos_id=self.tok.eos_id, pad_id=max(self.tok.pad_id, 0))
            text = self.tok.decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out
