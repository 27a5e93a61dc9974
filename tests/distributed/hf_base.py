"""A tiny transformers LLaMA and tokenizer built and saved locally (no downloads), and the rank
function of the init_from parity tests: our loss at step 0 through the real train module.

    make_tokenizer(DIR)                 a byte-level BPE tokenizer trained on a few stdlib files
    make_llama(DIR, vocab_size, ...)    a random LlamaForCausalLM, optionally in sharded files
    step0_loss(init_from, layout)       our fp32 loss on `BATCH` (any layout; run per rank)
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

SEQ = 16
ROWS = 4
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>"
                 "{% endfor %}")


def make_tokenizer(out_dir: Path, vocab_size: int = 320) -> Path:
    """A byte-level BPE tokenizer (any text encodes) with <unk>, <s>, </s>, <pad>, saved with
    save_pretrained (tokenizer.json, tokenizer_config.json) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import pretrain.data.tokenizer as corpus_a
    import pretrain.models.llama as corpus_b

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([inspect.getsource(corpus_a), inspect.getsource(corpus_b)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def make_llama(out_dir: Path, vocab_size: int, *, tie: bool = False, shard: bool = False,
               seed: int = 0, n_layers: int = 2, dtype: torch.dtype = torch.float32,
               dim: int = 32, heads: int = 4, kv_heads: int = 2, hidden: int = 64,
               max_shard_size: str = "40KB") -> Any:
    """A random LlamaForCausalLM (GQA, dim 32 by default) saved to `out_dir` (with `shard`, in
    several safetensors files with model.safetensors.index.json); returns the model in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=hidden,
                      num_hidden_layers=n_layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads,
                      max_position_embeddings=64, tie_word_embeddings=tie, bos_token_id=1,
                      eos_token_id=2, pad_token_id=3, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers zero-inits nothing we rely on; make norms non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(out_dir, max_shard_size=max_shard_size if shard else "5GB")
    return model.float()


def batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ROWS, SEQ) inputs and shifted targets, fixed."""
    g = torch.Generator().manual_seed(7)
    windows = torch.randint(0, vocab_size, (ROWS, SEQ + 1), generator=g)
    return windows[:, :-1], windows[:, 1:]


def hf_loss(model: Any, vocab_size: int) -> float:
    """transformers' mean next-token loss on `batch`, in fp32."""
    inputs, targets = batch(vocab_size)
    with torch.no_grad():
        logits = model(input_ids=inputs).logits.float()
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def step0_loss(init_from: str, dp_shard: int = 1, load: bool = True, *, tp: int = 1,
               pp: int = 1) -> dict[str, Any]:
    """Our loss on `batch` at step 0 (fp32), the train module built as the trainer builds it
    from `model_config_of(init_from)`: one process, FSDP over `dp_shard` ranks (each rank its
    rows; the mean over ranks), or tensor / pipeline parallel over `tp` / `pp` ranks (every
    rank all rows). `load=False`: the same model randomly initialized."""
    from pretrain.config import OptimConfig, ParallelConfig, output_whole_on_one_rank
    from pretrain.data.loader import Batch
    from pretrain.parallel.dims import ParallelDims
    from pretrain.train.initial import model_config_of
    from pretrain.train.module import StepSettings, build_train_module

    cfg = model_config_of(init_from)
    world = dist.get_world_size() if dist.is_initialized() else 1
    parallel = ParallelConfig(dp_shard=dp_shard, tp=tp, pp=pp, fsdp_param_dtype="fp32",
                              pp_microbatches=2)
    dims = ParallelDims(1, dp_shard, tp, pp, world)
    mesh = dims.build_mesh("cpu")
    settings = StepSettings(global_batch_size=ROWS, micro_batch_size=ROWS // dp_shard,
                            precision="fp32", seed=99, init_from=init_from if load else None,
                            chunked_loss=output_whole_on_one_rank(parallel))
    module = build_train_module(model=cfg, optim=OptimConfig(), parallel=parallel,
                                settings=settings, dims=dims, mesh=mesh,
                                device=torch.device("cpu"), total_steps=2)
    rank = dist.get_rank() if dist.is_initialized() and dp_shard > 1 else 0
    inputs, targets = batch(cfg.vocab_size)
    rows = slice(rank * ROWS // dp_shard, (rank + 1) * ROWS // dp_shard)
    loss = module.dp_mean(module.forward_backward([Batch(inputs[rows], targets[rows])]))
    return {"loss": float(loss), "sharded": type(next(module.model.parameters())).__name__}


def index_files(directory: Path) -> list[str]:
    """The weight files model.safetensors.index.json names."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def step0_losses(runs: list[tuple[str, dict[str, int]]]) -> list[dict[str, Any]]:
    """`step0_loss(path, **layout)` of several (path, layout) in one process group (spawning
    ranks costs most)."""
    return [step0_loss(path, **layout) for path, layout in runs]


def parity_report(directory: str) -> None:
    """Print transformers' step-0 loss of the LlamaForCausalLM in `directory` (fp32) and ours
    on one process and on 2 FSDP ranks (the README's figures)."""
    from transformers import AutoModelForCausalLM

    from tests.distributed.helpers import run_distributed

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ref = hf_loss(model, model.config.vocab_size)
    one = step0_loss(directory)["loss"]
    two = run_distributed(step0_losses, 2, [(directory, {"dp_shard": 2})])[0][0]["loss"]
    print(f"transformers {ref:.7f} | ours, 1 process {one:.7f} (|diff| {abs(one - ref):.1e}) | "
          f"ours, 2 FSDP ranks {two:.7f} (|diff| {abs(two - ref):.1e})")


def export_report(run: str, exported: str) -> None:
    """Print the largest logit difference between our checkpoint `run` and its export loaded by
    transformers, on 64 tokens of Python source encoded by the exported tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.train.consolidate import load_model_from_checkpoint

    hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(exported).encode(inspect.getsource(inspect))[:64]
    ours, _ = load_model_from_checkpoint(run)
    with torch.no_grad():
        x = torch.tensor([ids])
        diff = (hf(input_ids=x).logits - ours.eval()(x)).abs().max().item()
    print(f"{len(ids)} tokens: max |logits(transformers) - logits(ours)| = {diff:.1e}")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def load_memory(init_from: str, dp_shard: int) -> dict[str, float]:
    """This rank's memory and time for `load_initial_weights` alone: the train module is built
    without it, the peak RSS reset (Linux clear_refs), then the weights loaded."""
    import time

    from pretrain.config import OptimConfig, ParallelConfig
    from pretrain.parallel.dims import ParallelDims
    from pretrain.train.initial import load_initial_weights, model_config_of
    from pretrain.train.module import StepSettings, build_train_module

    cfg = model_config_of(init_from)
    world = dist.get_world_size() if dist.is_initialized() else 1
    dims = ParallelDims(1, dp_shard, 1, 1, world)
    module = build_train_module(
        model=cfg, optim=OptimConfig(), parallel=ParallelConfig(dp_shard=dp_shard,
                                                                fsdp_param_dtype="fp32"),
        settings=StepSettings(global_batch_size=dp_shard, micro_batch_size=1,
                              precision="fp32"),
        dims=dims, mesh=dims.build_mesh("cpu"), device=torch.device("cpu"), total_steps=1)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                for p in module.model.parameters()) * 4
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    load_initial_weights(module.parts, init_from, cfg)
    seconds = time.perf_counter() - t0
    return {"peak_extra_mib": (_rss_kib("VmHWM") - before) / 1024, "seconds": seconds,
            "local_fp32_mib": local / 2**20}


def load_report(directory: str) -> None:
    """Print, for the LlamaForCausalLM in `directory`, the extra peak memory and time of
    loading it on 1 process and on each of 2 FSDP ranks (the README's figure)."""
    from tests.distributed.helpers import run_distributed

    files = sum(f.stat().st_size for f in Path(directory).glob("*.safetensors")) / 2**20
    print(f"{directory}: {files:.0f} MiB of safetensors")
    rows = [("1 process", [load_memory(directory, 1)]),
            ("2 FSDP ranks", run_distributed(load_memory, 2, directory, 2))]
    for name, ranks in rows:
        for i, r in enumerate(ranks):
            print(f"{name}, rank {i}: holds {r['local_fp32_mib']:.0f} MiB of fp32 weights; "
                  f"loading: peak RSS +{r['peak_extra_mib']:.0f} MiB, {r['seconds']:.1f} s")
