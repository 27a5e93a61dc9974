"""lm-eval-harness's `pretrain` model type against `pretrain-eval`: the same numbers on the same
local task files. The harness reads them through task YAMLs made from its own official configs
(hellaswag with its utils.py, arc_easy, piqa, winogrande with its preprocessing, lambada_openai),
with only the dataset pointed at the local JSONL files."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from pretrain.config import ModelConfig  # noqa: E402
from pretrain.data.builtin import iter_builtin_documents  # noqa: E402
from pretrain.data.tokenizer import train_tokenizer  # noqa: E402
from pretrain.eval.synthetic import write_synthetic  # noqa: E402
from pretrain.interop.hf import export_hf  # noqa: E402
from pretrain.models.build import build_model  # noqa: E402
from tools.eval import main as pretrain_eval  # noqa: E402

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
# ours -> (official config, its helper module, the split our files hold)
OFFICIAL = {
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/utils.py", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", None, "test"),
    "piqa": ("piqa/piqa.yaml", None, "validation"),
    "winogrande": ("winogrande/default.yaml", "winogrande/preprocess_winogrande.py",
                   "validation"),
    "lambada": ("lambada/lambada_openai.yaml", None, "test"),
}
ITEMS = 12


def _local_yaml(task: str, root: Path, data: Path, out: Path) -> None:
    """The official config with its dataset replaced by our JSONL file (every split the
    config names reads it) and the task renamed local_<task>."""
    config, helper, split = OFFICIAL[task]
    text = (LM_EVAL_TASKS / config).read_text()
    text = re.sub(r"(?m)^tag:\n(  - .*\n)+", "", text)
    text = re.sub(r"(?m)^task: .*$", f"task: local_{task}", text)
    text = re.sub(r"(?m)^dataset_name: .*\n", "", text)
    path = data / task / f"{split}.jsonl"
    files = "\n".join(f"    {s}: {path}" for s in ("train", "validation", "test"))
    text = re.sub(r"(?m)^dataset_path: .*$",
                  f"dataset_path: json\ndataset_kwargs:\n  data_files:\n{files}", text)
    folder = out / task
    folder.mkdir(parents=True)
    (folder / f"local_{task}.yaml").write_text(text)
    if helper is not None:
        shutil.copy(LM_EVAL_TASKS / helper, folder / Path(helper).name)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("harness")
    docs = list(itertools.islice(iter_builtin_documents(), 120))
    train_tokenizer(docs, str(root / "tok.model"), vocab_size=600)
    cfg = ModelConfig(name="tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=600,
                      multiple_of=16, max_seq_len=64)
    torch.manual_seed(0)
    export_hf(build_model(cfg, device="cpu").state_dict(), cfg, root / "hf",
              tokenizer_path=str(root / "tok.model"))
    write_synthetic(root / "data", ITEMS, tasks=list(OFFICIAL))
    for task in OFFICIAL:
        _local_yaml(task, root, root / "data", root / "yaml")
    return {"root": root}


def test_harness_numbers_equal_pretrain_eval(setup: dict) -> None:
    from lm_eval.tasks import TaskManager

    import pretrain.eval.harness  # noqa: F401  (registers model="pretrain")

    root = setup["root"]
    out = root / "ours.json"
    assert pretrain_eval([str(root / "hf"), "--tasks", ",".join(OFFICIAL), "--data-dir",
                          str(root / "data"), "--batch-size", "5", "--out", str(out)]) == 0
    ours = {(r["task"], r["metric"]): r["value"] for r in json.loads(out.read_text())["results"]}
    results = lm_eval.simple_evaluate(
        model="pretrain", model_args=f"checkpoint={root / 'hf'},batch_size=3",
        tasks=[f"local_{t}" for t in OFFICIAL],
        task_manager=TaskManager(include_path=str(root / "yaml"), include_defaults=False),
        bootstrap_iters=0, log_samples=False)["results"]
    compared = 0
    for (task, metric), value in ours.items():
        theirs = results[f"local_{task}"][f"{metric},none"]
        assert theirs == pytest.approx(value, rel=1e-6, abs=1e-6), (task, metric)
        compared += 1
    assert compared == 2 * 3 + 1 + 2  # acc+acc_norm ×3, winogrande acc, lambada acc+ppl
    assert len({ours["hellaswag", "acc"], ours["hellaswag", "acc_norm"],
                ours["piqa", "acc"]}) > 1  # not all one value: the comparison can fail


def test_rolling_and_generation_requests(setup: dict) -> None:
    from lm_eval.api.instance import Instance

    from pretrain.eval.downstream import prefix_id
    from pretrain.eval.harness import PretrainLM

    lm = PretrainLM(checkpoint=str(setup["root"] / "hf"), batch_size="4", max_length=16)
    text = "def add(a, b):\n    return a + b\n" * 4
    ids = lm.tok.encode(text)
    assert len(ids) > 40  # several windows of 16
    [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    # direct: lm-eval's windows (context 1): blocks of 16 predicted tokens, each block's
    # input the 16 tokens before its end (the prefix token first), each token scored once
    seq = [prefix_id(lm.tok), *ids]  # ids[k] is predicted from seq[:k + 1]
    logp = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), 16):
            end = min(start + 16, len(ids))
            inp = seq[max(0, end - 16):end]
            logits = lm.model(torch.tensor([inp])).double().log_softmax(-1)[0]
            rows = logits[len(inp) - (end - start):]
            logp += float(sum(rows[j, t] for j, t in enumerate(ids[start:end])))
    assert rolling == pytest.approx(logp, abs=1e-4)
    [gen] = lm.generate_until([Instance("generate_until", {}, (
        "def ", {"until": ["\n"], "max_gen_toks": 8}), 0)])
    assert isinstance(gen, str) and "\n" not in gen


def test_pretrain_lm_eval_passes_the_harness_arguments_through(setup: dict) -> None:
    """The console script: lm-eval's own flags, `--model pretrain` known to its registry."""
    from tests.conftest import console_script

    root = setup["root"]
    proc = subprocess.run(
        [console_script("pretrain-lm-eval"), "--model", "pretrain", "--model_args",
         f"checkpoint={root / 'hf'},batch_size=4", "--tasks", "local_piqa", "--include_path",
         str(root / "yaml"), "--limit", "4"],
        capture_output=True, text=True, timeout=300, cwd=root,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"local_piqa.*\|acc\s*\|", proc.stdout), proc.stdout
