"""DeepSpeed checkpoints read on one process, the user's way: a tiny model trained by the real
entry under torchrun on 2 ranks with the DeepSpeed backend (ZeRO stages 1, 2 and 3), then the
installed `pretrain-consolidate`, `pretrain-export-hf` and `pretrain-generate` on the run.

The consolidated weights must be DeepSpeed's own full weights of the final model: stages 1 and 2
keep them whole in `mp_rank_00_model_states.pt` (exact), and stage 3, which partitions them,
must give those of stage 1 run with the same config. They must have moved from the init by a
few learning-rate steps (which also proves the init is the run's), and transformers'
`LlamaForCausalLM` loaded from the export must give our model's logits.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.models.llama import build_model, draw_init_seed
from tests.conftest import REPO, TINY, console_script, train_env
from tests.distributed.helpers import torchrun_cmd

transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

STEPS = ["steps=3", "ckpt_every=3", "eval_every=0"]
STEP_DIR = "checkpoints/step_00000003"
# Stages 1 and 3 share a config (tied embeddings: DeepSpeed records output.weight as shared);
# stage 2 checkpoints its blocks, so DeepSpeed's names carry the wrapper's prefix.
STAGES = {
    1: ["parallel=zero1", "model.tie_embeddings=true"],
    2: ["parallel=zero2", "activation_checkpointing=full"],
    3: ["parallel=zero3", "model.tie_embeddings=true"],
}


def run_tool(cache_dir: Path, name: str, *args: str,
             check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([console_script(name), *args], env=train_env(cache_dir),
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"{name} {' '.join(args)} failed:\n{proc.stdout}\n" \
                                     f"{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def ds_run(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """Train (once per module) and return the run directory of a ZeRO stage."""
    out = tmp_path_factory.mktemp("deepspeed_export")
    runs: dict[int, Path] = {}

    def get(stage: int) -> Path:
        if stage not in runs:
            name = f"zero{stage}"
            cmd = [*torchrun_cmd(2, "-m", "launch.train"), *TINY, *STEPS,
                   f"output_root={out}", f"run_name={name}", *STAGES[stage]]
            proc = subprocess.run(cmd, cwd=REPO, env={**train_env(cache_dir),
                                  "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0, f"zero{stage} training failed:\n" \
                                         f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            runs[stage] = out / name
            assert (runs[stage] / STEP_DIR / "deepspeed").is_dir()
        return runs[stage]

    return get


def deepspeed_module_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own whole copy of the final weights (ZeRO 1/2 save the module unpartitioned),
    under our names."""
    blob = torch.load(run_dir / STEP_DIR / "deepspeed" / "mp_rank_00_model_states.pt",
                      map_location="cpu", weights_only=False)
    return {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in blob["module"].items()}


def init_weights(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """The run's initial weights: the base seed drawn after `torch.manual_seed(seed)`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = draw_init_seed()
    model = build_model(cfg, device="cpu")
    with torch.no_grad():
        model.init_weights(seed=base)
    return model.state_dict()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_consolidate_and_export_a_zero_run(stage: int, ds_run: Callable[[int], Path],
                                           cache_dir: Path, tmp_path: Path) -> None:
    run_dir = ds_run(stage)
    run_tool(cache_dir, "pretrain-consolidate", str(run_dir), str(tmp_path / "model.pt"))
    blob = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=False)
    weights, state = blob["model"], blob["state"]
    cfg = ModelConfig(**state["config"]["model"])
    assert state["counters"]["step"] == 3
    model = build_model(cfg, device="cpu")
    model.load_state_dict(weights, strict=True)  # exactly our names, shapes and nothing else
    model.eval()
    if cfg.tie_embeddings:
        assert torch.equal(weights["output.weight"], weights["tok_embeddings.weight"])

    if stage in (1, 2):
        reference = deepspeed_module_weights(run_dir)
        assert reference.keys() == weights.keys()
        for k, v in reference.items():
            assert torch.equal(weights[k], v.float()), k
    else:
        reference = deepspeed_module_weights(ds_run(1))
        for k, v in reference.items():
            torch.testing.assert_close(weights[k], v.float(), rtol=0, atol=1e-5, msg=k)

    init = init_weights(cfg, state["config"]["seed"])
    for k, w0 in init.items():
        moved = (weights[k] - w0).abs().max().item()
        # 3 AdamW steps at lr <= 3e-3 move a weight by at most ~1e-2; another init by ~0.1.
        assert 1e-4 < moved < 0.03, (k, moved)

    proc = run_tool(cache_dir, "pretrain-export-hf", str(run_dir), str(tmp_path / "hf"))
    assert "verified: transformers' logits match ours to " in proc.stdout, proc.stdout
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf",
                                                       attn_implementation="eager")
    hf.eval()
    x = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x), rtol=0, atol=1e-4)


def test_generate_from_a_zero3_run(ds_run: Callable[[int], Path], cache_dir: Path) -> None:
    proc = run_tool(cache_dir, "pretrain-generate", str(ds_run(3)), "--max-new-tokens", "4")
    assert proc.stdout.startswith("--- 'def '\ndef "), proc.stdout


def test_a_missing_zero_partition_is_named(ds_run: Callable[[int], Path], cache_dir: Path,
                                           tmp_path: Path) -> None:
    """A rank's optimizer file (its slice of the fp32 weights) gone, manifest rewritten to
    match: a one-line error naming the DeepSpeed directory, no traceback."""
    from pretrain.train.checkpoint import write_integrity

    ckpt = tmp_path / "step_00000003"
    shutil.copytree(ds_run(2) / STEP_DIR, ckpt)
    (ckpt / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    write_integrity(ckpt)
    proc = run_tool(cache_dir, "pretrain-consolidate", str(ckpt), str(tmp_path / "model.pt"),
                    check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"{ckpt / 'deepspeed'}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "model.pt").exists()
