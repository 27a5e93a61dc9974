"""Generate from a run's checkpoint (either backend, any layout) on one process, by model family.

    decoder          continue a prompt, or fill in the middle (a run trained with objective=fim):
                       pretrain-generate runs/NAME --prompt "def " --max-new-tokens 64 --top-k 50
                       pretrain-generate runs/NAME --prefix "def add(a, b):" --suffix "\\n\\n"
                     many prompts at once (one per line, or .jsonl with a "prompt" field),
                     one JSON line per prompt, in input order:
                       pretrain-generate runs/NAME --prompts-file prompts.txt --batch-size 16
                       pretrain-generate runs/NAME --prompts-file prompts.txt --benchmark
                     answer as a chat model (a run trained with objective=sft): the message is
                     rendered with the run's chat template (its generation prompt included) and
                     the answer stops at EOS or the template's end-of-turn token:
                       pretrain-generate runs/NAME --chat "What is 2 + 3?" --temperature 0
                       pretrain-generate runs/NAME --chat --prompts-file questions.txt
                     (one user message per line, or .jsonl with a "messages" list per line)
    encoder          fill each <mask> of the prompt; prints the text and the top-k per mask:
                       pretrain-generate runs/BERT --prompt "The <mask> sat on the mat." --top-k 5
    encoder_decoder  decode from the prompt, which may hold T5 sentinels (<extra_id_0>, ...):
                       pretrain-generate runs/T5 --prompt "The <extra_id_0> sat on <extra_id_1>."

The family is the checkpoint's `model.arch`. Sampling (temperature, top-k, top-p) uses a KV
cache; --temperature 0 is greedy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.data.sft import DefaultTemplate, HFChatTemplate, chat_template
from pretrain.data.tokenizer import MASK, SENTINELS, Tokenizer
from pretrain.errors import PretrainError
from pretrain.eval.generate import (
    decode_with_specials,
    encode_with_specials,
    fill_mask_text,
    generate,
    generate_many,
    generate_seq2seq,
    infill,
    read_chats,
    read_prompts,
    time_batch_sizes,
)
from pretrain.quant.ptq import load_for_generation, trainer_state_of
from pretrain.train.checkpoint import load_trainer_state, resolve_checkpoint

DEFAULT_TEMPERATURE = 0.8
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_TOP_K_MASKS = 5
DEFAULT_BATCH_SIZE = 16
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
    p.add_argument("--prompts-file", type=Path,
                   help="decoder: continue every prompt of this file, many at once (one prompt "
                        "per line; a .jsonl file: one object with a \"prompt\" field per line)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"with --prompts-file: prompts per batch (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--out", type=Path,
                   help="with --prompts-file: write the JSON lines here (default stdout)")
    p.add_argument("--chat", action="append", nargs="?", const="", metavar="MESSAGE",
                   help="decoder: answer MESSAGE as the user's turn, rendered with the run's "
                        "chat template; stops at its end-of-turn token (repeatable). Alone with "
                        "--prompts-file: each line is a user message (.jsonl: \"messages\")")
    p.add_argument("--system", help="with --chat: a system message before each user message")
    p.add_argument("--benchmark", action="store_true",
                   help="with --prompts-file: print tokens/s at batch size 1 and --batch-size "
                        "instead of the completions")
    return p


def check_flags(args: argparse.Namespace, arch: str) -> None:
    """UsageError, in one line, for flags that mean nothing to the model family `arch`."""
    infilling = args.prefix is not None or args.suffix is not None
    _check_batch_flags(args, arch, infilling)
    _check_chat_flags(args, arch, infilling)
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


def _check_chat_flags(args: argparse.Namespace, arch: str, infilling: bool) -> None:
    if args.chat is None:
        if args.system is not None:
            raise UsageError("--system goes with --chat; add --chat \"MESSAGE\", or drop it")
        return
    if arch != "decoder":
        raise UsageError(f"--chat answers with a decoder; this checkpoint is an {arch}: give "
                         "its input with --prompt")
    if args.prompt or infilling:
        raise UsageError("--chat \"MESSAGE\" is the prompt; drop --prompt/--prefix/--suffix")
    messages = [m for m in args.chat if m]
    if args.prompts_file is not None and messages:
        raise UsageError("--chat with --prompts-file takes the messages from the file; give "
                         "--chat without a message")
    if args.prompts_file is None and len(messages) < len(args.chat):
        raise UsageError("--chat needs the user's message, e.g. --chat \"What is 2 + 3?\" "
                         "(or --prompts-file F with one message per line)")


def _check_batch_flags(args: argparse.Namespace, arch: str, infilling: bool) -> None:
    if args.prompts_file is None:
        given = [flag for flag, value in (("--batch-size", args.batch_size), ("--out", args.out),
                                          ("--benchmark", args.benchmark or None))
                 if value is not None]
        if given:
            raise UsageError(f"{' '.join(given)} go with --prompts-file F; add it, or drop them")
        return
    if arch != "decoder":
        raise UsageError(f"--prompts-file batches decoder generation; this checkpoint is an "
                         f"{arch}: give its inputs with --prompt")
    if args.prompt or infilling:
        raise UsageError("--prompts-file takes the prompts from the file; drop "
                         "--prompt/--prefix/--suffix")
    if args.no_cache:
        raise UsageError("--no-cache: batched generation always decodes through the KV cache; "
                         "drop it (or use --prompt)")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}; use a positive integer")
    if args.out is not None and not args.out.parent.is_dir():
        raise UsageError(f"--out {args.out}: the directory {args.out.parent} does not exist; "
                         "create it first")


def _decoding(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=DEFAULT_TEMPERATURE if args.temperature is None else args.temperature,
        top_k=args.top_k, top_p=args.top_p)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    seed = 0 if args.seed is None else args.seed
    return dict(**_decoding(args), use_cache=not args.no_cache,
                generator=torch.Generator().manual_seed(seed))


def _with_bos(tok: Tokenizer, text: str) -> list[int]:
    """`text`'s ids after BOS, unless they already start with it (an HF tokenizer reads "<s>"
    written in the text as BOS)."""
    ids = tok.encode(text)
    return ids if tok.bos_id is None or ids[:1] == [tok.bos_id] else [tok.bos_id, *ids]


def _chat_template(tok: Tokenizer, state: dict[str, Any]) -> DefaultTemplate | HFChatTemplate:
    """The template the run trained with (`pretrain.data.sft.chat_template`, as objective=sft
    renders its data)."""
    objective = state.get("config", {}).get("objective", {}).get("name", "clm")
    if objective != "sft":
        print(f"note: this run trained objective={objective}, not sft; it has not learnt the "
              "chat template", file=sys.stderr)
    return chat_template(tok)


def _system(args: argparse.Namespace) -> list[dict[str, str]]:
    return [] if args.system is None else [{"role": "system", "content": args.system}]


def run_decoder(model: nn.Module, tok: Tokenizer, args: argparse.Namespace,
                state: dict[str, Any]) -> None:
    sampling = _sampling(args)
    if args.chat is not None:
        template = _chat_template(tok, state)
        for message in args.chat:
            ids = template.prompt([*_system(args), {"role": "user", "content": message}])
            new = generate(model, ids, eos_id=tok.eos_id, stop_ids=template.stop_ids(), **sampling)
            print(f"--- {message!r}\n{tok.decode(new)}")
        return
    if args.prefix is None and args.suffix is None:
        for prompt in args.prompt or ["def "]:
            new = generate(model, _with_bos(tok, prompt), eos_id=tok.eos_id, **sampling)
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


def run_batched(model: nn.Module, tok: Tokenizer, args: argparse.Namespace,
                records: list[dict[str, Any]], state: dict[str, Any]) -> None:
    """Every prompt of the file, `--batch-size` at a time: one JSON line per prompt, in input
    order, or with --benchmark the tokens/s of batch size 1 against --batch-size. With --chat
    the records are conversations, rendered and stopped as `run_decoder` does."""
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    stop_ids: list[int] = []
    if args.chat is None:
        prompts = [_with_bos(tok, r["prompt"]) for r in records]
    else:
        template = _chat_template(tok, state)
        prompts = [template.prompt([*_system(args), *r["messages"]]) for r in records]
        stop_ids = template.stop_ids()
    kwargs = dict(**_decoding(args), eos_id=tok.eos_id, stop_ids=stop_ids, pad_id=tok.pad_id,
                  seed=0 if args.seed is None else args.seed)
    if args.benchmark:
        _print_timings(model, prompts, batch_size, kwargs)
        return
    start = time.perf_counter()
    outputs = generate_many(model, prompts, batch_size=batch_size, **kwargs)
    seconds = time.perf_counter() - start
    max_len = model.config.max_seq_len
    lines = []
    for record, ids, new in zip(records, prompts, outputs):
        cap = min(kwargs["max_new_tokens"], max_len - len(ids))  # a shorter one met EOS
        lines.append(json.dumps({**record, "completion": tok.decode(new),
                                 "new_tokens": len(new),
                                 "finish_reason": "length" if len(new) == cap else "stop"}))
    text = "".join(line + "\n" for line in lines)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
    n_new = sum(map(len, outputs))
    print(f"{len(records)} prompts, {n_new} new tokens in {seconds:.1f} s "
          f"({n_new / seconds:.0f} tokens/s, batch size {batch_size})", file=sys.stderr)


def _print_timings(model: nn.Module, prompts: list[list[int]], batch_size: int,
                   kwargs: dict[str, Any]) -> None:
    repeats = 3
    timings, same = time_batch_sizes(model, prompts, sorted({1, batch_size}), repeats=repeats,
                                     **kwargs)
    print(f"{len(prompts)} prompts, max_new_tokens={kwargs['max_new_tokens']}, "
          f"temperature={kwargs['temperature']}, {torch.get_num_threads()} threads, "
          f"fastest of {repeats}")
    print("| batch size | new tokens | seconds | tokens/s | vs batch 1 |")
    print("|---:|---:|---:|---:|---:|")
    for t in timings:
        print(f"| {t.batch_size} | {t.new_tokens} | {t.seconds:.2f} | {t.tokens_per_s:.0f} | "
              f"{t.tokens_per_s / timings[0].tokens_per_s:.2f}x |")
    print(f"same completions at every batch size: {'yes' if same else 'NO'}")


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
        read = read_prompts if args.chat is None else read_chats
        records = read(args.prompts_file) if args.prompts_file is not None else None
        model, state = load_for_generation(args.checkpoint)  # checkpoint or quantized
        tokenizer = Tokenizer.load(args.tokenizer or state["tokenizer_path"])
        model.eval()
        if records is not None:
            run_batched(model, tokenizer, args, records, state)
        else:
            RUNNERS[arch](model, tokenizer, args, state)
    except (PretrainError, ValueError) as e:  # user errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
