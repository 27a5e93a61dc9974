"""Generate from a run's checkpoint (either backend, any layout) on one process, by model family.

    decoder          continue a prompt, or fill in the middle (a run trained with objective=fim):
                       pretrain-generate runs/NAME --prompt "def " --max-new-tokens 64 --top-k 50
                       pretrain-generate runs/NAME --prefix "def add(a, b):" --suffix "\\n\\n"
    encoder          fill each <mask> of the prompt; prints the text and the top-k per mask:
                       pretrain-generate runs/BERT --prompt "The <mask> sat on the mat." --top-k 5
    encoder_decoder  decode from the prompt, which may hold T5 sentinels (<extra_id_0>, ...):
                       pretrain-generate runs/T5 --prompt "The <extra_id_0> sat on <extra_id_1>."

The family is the checkpoint's `model.arch`. Sampling (temperature, top-k, top-p) uses a KV
cache; --temperature 0 is greedy.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from torch import nn

from pretrain.data.tokenizer import MASK, SENTINELS, Tokenizer
from pretrain.errors import PretrainError
from pretrain.eval.generate import (
    decode_with_specials,
    encode_with_specials,
    fill_mask_text,
    generate,
    generate_seq2seq,
    infill,
)
from pretrain.quant.ptq import load_for_generation, trainer_state_of
from pretrain.train.checkpoint import load_trainer_state, resolve_checkpoint

DEFAULT_TEMPERATURE = 0.8
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_TOP_K_MASKS = 5
_SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_p", "seed", "no_cache")


class UsageError(ValueError):
    """Flags that do not fit the checkpoint's model family."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="run directory, checkpoints/ directory or one checkpoint, "
                   "or a quantized model directory (pretrain-quantize)")
    p.add_argument("--prompt", action="append",
                   help="decoder: text to continue (default 'def '); encoder: text with <mask>; "
                        "encoder_decoder: input text, may hold <extra_id_N> (repeatable)")
    p.add_argument("--prefix", help="decoder: infill the middle after this text (FIM)")
    p.add_argument("--suffix", help="decoder: infill the middle before this text (FIM)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default {DEFAULT_MAX_NEW_TOKENS}")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"0 = greedy (default {DEFAULT_TEMPERATURE})")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample from the k most probable tokens; encoder: predictions shown per "
                        f"mask (default {DEFAULT_TOP_K_MASKS})")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default 0)")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the run's)")
    p.add_argument("--no-cache", action="store_true", default=None,
                   help="recompute the prefix every step")
    return p


def check_flags(args: argparse.Namespace, arch: str) -> None:
    """UsageError, in one line, for flags that mean nothing to the model family `arch`."""
    infilling = args.prefix is not None or args.suffix is not None
    if arch == "decoder":
        if infilling and args.prompt:
            raise UsageError("--prompt continues a text, --prefix/--suffix fill in a middle; "
                             "give one or the other")
        return
    if infilling:
        what = "<mask> in --prompt" if arch == "encoder" else "<extra_id_N> sentinels in --prompt"
        raise UsageError(f"--prefix/--suffix fill in the middle with a decoder; this checkpoint "
                         f"is an {arch}: mark what to fill with {what}")
    if not args.prompt:
        example = "The <mask> sat." if arch == "encoder" else "The <extra_id_0> sat."
        raise UsageError(f"an {arch} checkpoint needs --prompt, e.g. --prompt {example!r}")
    if arch == "encoder":
        given = [f"--{f.replace('_', '-')}" for f in _SAMPLING_FLAGS
                 if getattr(args, f) is not None]
        if given:
            raise UsageError(f"{' '.join(given)}: an encoder predicts every <mask> in one pass "
                             "and samples nothing; only --top-k applies")
        for prompt in args.prompt:
            if MASK not in prompt:
                raise UsageError(f"prompt {prompt!r} has no {MASK}; write {MASK} where the "
                                 "encoder should predict a token")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    seed = 0 if args.seed is None else args.seed
    return dict(
        max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=DEFAULT_TEMPERATURE if args.temperature is None else args.temperature,
        top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache,
        generator=torch.Generator().manual_seed(seed))


def run_decoder(model: nn.Module, tok: Tokenizer, args: argparse.Namespace,
                state: dict[str, Any]) -> None:
    sampling = _sampling(args)
    if args.prefix is None and args.suffix is None:
        for prompt in args.prompt or ["def "]:
            new = generate(model, tok.encode(prompt, bos=True), eos_id=tok.eos_id, **sampling)
            print(f"--- {prompt!r}\n{prompt}{tok.decode(new)}")
        return
    fim_ids = tok.fim_ids  # DataError naming the tokenizer and the fix when it has none
    objective = state.get("config", {}).get("objective", {}).get("name", "clm")
    if objective != "fim":
        print(f"note: this run trained objective={objective}, not fim; its infills mean little",
              file=sys.stderr)
    prefix, suffix = args.prefix or "", args.suffix or ""
    middle = infill(model, tok.encode(prefix), tok.encode(suffix), fim_ids=fim_ids,
                    eos_id=tok.eos_id, **sampling)
    text = tok.decode(middle)
    print(f"--- middle\n{text}\n--- {prefix!r} + middle + {suffix!r}\n{prefix}{text}{suffix}")


def run_encoder(model: nn.Module, tok: Tokenizer, args: argparse.Namespace,
                state: dict[str, Any]) -> None:
    top_k = args.top_k or DEFAULT_TOP_K_MASKS
    for prompt in args.prompt:
        filled, predictions = fill_mask_text(model, tok, prompt, top_k=top_k)
        print(f"--- {prompt!r}\n{filled}")
        for n, p in enumerate(predictions):
            shown = "  ".join(f"{_token(tok, i)} {prob:.3f}" for i, prob in zip(p.ids, p.probs))
            print(f"{MASK} {n}: {shown}")


def _token(tok: Tokenizer, i: int) -> str:
    text = tok.decode([i])
    return repr(text) if text else f"<id {i}>"  # control pieces decode to nothing


def run_seq2seq(model: nn.Module, tok: Tokenizer, args: argparse.Namespace,
                state: dict[str, Any]) -> None:
    sampling = _sampling(args)
    for prompt in args.prompt:
        ids = encode_with_specials(tok, prompt, SENTINELS) + [tok.eos_id]  # T5 inputs end in EOS
        [new] = generate_seq2seq(model, [ids], eos_id=tok.eos_id, start_id=tok.pad_id,
                                 pad_id=tok.pad_id, **sampling)
        print(f"--- {prompt!r}\n{decode_with_specials(tok, new, SENTINELS)}")


RUNNERS = {"decoder": run_decoder, "encoder": run_encoder, "encoder_decoder": run_seq2seq}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        state = (trainer_state_of(args.checkpoint)  # a quantized model directory
                 or load_trainer_state(resolve_checkpoint(args.checkpoint)))
        arch = state.get("config", {}).get("model", {}).get("arch", "decoder")
        if arch not in RUNNERS:
            raise UsageError(f"checkpoint model.arch={arch!r}; pretrain-generate knows "
                             f"{', '.join(RUNNERS)}")
        check_flags(args, arch)  # before the weights are read
        model, state = load_for_generation(args.checkpoint)  # checkpoint or quantized
        tokenizer = Tokenizer.load(args.tokenizer or state["tokenizer_path"])
        model.eval()
        RUNNERS[arch](model, tokenizer, args, state)
    except (PretrainError, ValueError) as e:  # user errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
