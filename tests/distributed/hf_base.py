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
               seed: int = 0, n_layers: int = 2, dtype: torch.dtype = torch.float32) -> Any:
    """A random LlamaForCausalLM (GQA, dim 32) saved to `out_dir` (with `shard`, in several
    safetensors files with model.safetensors.index.json); returns the model in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=tie, bos_token_id=1,
                      eos_token_id=2, pad_token_id=3, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers zero-inits nothing we rely on; make norms non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(out_dir, max_shard_size="40KB" if shard else "5GB")
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


def step0_loss(init_from: str, dp_shard: int = 1, load: bool = True) -> dict[str, Any]:
    """Our loss on `batch` at step 0 (fp32), the train module built as the trainer builds it
    from `model_config_of(init_from)`: one process, or FSDP over `dp_shard` ranks (each rank
    its rows; the mean over ranks). `load=False`: the same model randomly initialized."""
    from pretrain.config import OptimConfig, ParallelConfig
    from pretrain.data.loader import Batch
    from pretrain.parallel.dims import ParallelDims
    from pretrain.train.initial import model_config_of
    from pretrain.train.module import StepSettings, build_train_module

    cfg = model_config_of(init_from)
    world = dist.get_world_size() if dist.is_initialized() else 1
    parallel = ParallelConfig(dp_shard=dp_shard, fsdp_param_dtype="fp32")
    dims = ParallelDims(1, dp_shard, 1, 1, world)
    mesh = dims.build_mesh("cpu")
    settings = StepSettings(global_batch_size=ROWS, micro_batch_size=ROWS // dp_shard,
                            precision="fp32", seed=99,
                            init_from=init_from if load else None)
    module = build_train_module(model=cfg, optim=OptimConfig(), parallel=parallel,
                                settings=settings, dims=dims, mesh=mesh,
                                device=torch.device("cpu"), total_steps=2)
    rank = dist.get_rank() if dist.is_initialized() else 0
    inputs, targets = batch(cfg.vocab_size)
    rows = slice(rank * ROWS // dp_shard, (rank + 1) * ROWS // dp_shard)
    stats = module.train_step([Batch(inputs[rows], targets[rows])])
    return {"loss": float(stats.loss), "sharded": type(next(module.model.parameters())).__name__}


def index_files(directory: Path) -> list[str]:
    """The weight files model.safetensors.index.json names."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def step0_losses(paths: list[str], dp_shard: int) -> list[dict[str, Any]]:
    """`step0_loss` of several bases in one process group (spawning ranks costs most)."""
    return [step0_loss(p, dp_shard) for p in paths]
