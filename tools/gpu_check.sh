#!/usr/bin/env bash
# The GPU check: one command, at most 9 minutes on one GPU, no network, the machine's own
# PyTorch (DeepSpeed not needed). It runs the tests marked `gpu`, the main job with its CUDA
# defaults (compile on) to its end, samples included, then the benchmark of the 1b preset
# (transformers, our eager and compiled model, the kernels-only floor; flash SDPA, seq 4096,
# bf16) and of the 125m preset, and prints the main job's summary and one table of both last.
#
#   tools/gpu_check.sh [--dry] [--out DIR]
#
# --dry   the same sequence on the CPU with a tiny model and one step: proves the script works
#         (the unit tests run it) without a GPU.
# --out   where the JSON reports go (default: $OUT when set, else a new temporary directory).
# Exit status: 0 when every part ran, 1 otherwise (the table shows whatever did run).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
out="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) dry=1 ;;
    --out) out="$2"; shift ;;
    *) echo "usage: tools/gpu_check.sh [--dry] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
out="${out:-$(mktemp -d)}"
mkdir -p "$out"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Nothing may reach the network: hub lookups and W&B stay offline.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

if [ "$dry" = 1 ]; then
  device=(--device cpu)
  big=(--model debug --seq-len 32 --batch-size 2)
  small=(--model debug --seq-len 32 --batch-size 2)
  steps=(--warmup 1 --steps 1)
  main=(model=debug model.vocab_size=512 data.max_bytes=400000 data.tokenizer_sample_bytes=200000
        seq_len=64 global_batch_size=8 micro_batch_size=4 steps=3 sample_tokens=8 compile=true)
  limits=(120 150 120 120)
else
  device=(--device cuda)
  big=(--model 1b --seq-len 4096 --batch-size 4)
  small=(--model 125m --seq-len 2048 --batch-size 8)
  steps=(--warmup 2 --steps 5)
  main=(time_limit_s=120)  # the CUDA defaults: compile on, bf16, flash attention
  # Seconds for: gpu tests, main job, 1b, 125m (sum 520 s, leaving room under 9 minutes).
  limits=(90 160 180 90)
fi

failed=0
part() {  # part NAME SECONDS COMMAND...: run with a time limit, report, never abort the script
  local name="$1" limit="$2"
  shift 2
  echo "== $name" >&2
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "== $name FAILED: over its ${limit} s limit" >&2
    failed=1
  elif [ "$rc" != 0 ]; then
    echo "== $name FAILED (exit $rc)" >&2
    failed=1
  fi
}

python - <<'EOF' || exit 1
import importlib.util, sys
missing = [m for m in ("torch", "omegaconf", "hydra", "pytest")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages {missing}; install the project's "
             "requirements (pip install -e .[dev]) in this environment")
if importlib.util.find_spec("transformers") is None:
    print("gpu_check: transformers absent: the hf baseline rows are skipped", file=sys.stderr)
EOF

# Rows run one after another on a GPU and each is saved as it finishes: the compiled model
# comes first, so that a run cut short by its limit still reports it.
part "tests marked gpu" "${limits[0]}" python -m pytest -m gpu -q -p no:cacheprovider tests
runs="$(mktemp -d)"
part "main job (compiled)" "${limits[1]}" env PRETRAIN_CACHE="$runs/cache" python -m launch.train \
  "${main[@]}" logging=none logging.progress_bar=false output_root="$runs" run_name=main
[ -f "$runs/main/summary.json" ] && cp "$runs/main/summary.json" "$out/main_job.json"
part "benchmark ${big[1]}" "${limits[2]}" python -m tools.bench "${big[@]}" "${device[@]}" \
  "${steps[@]}" --sdpa flash --rows +compile,+chunked-ce,hf,kernels --json "$out/big.json"
part "benchmark ${small[1]}" "${limits[3]}" python -m tools.bench "${small[@]}" "${device[@]}" \
  "${steps[@]}" --sdpa flash --rows +compile,+chunked-ce,plain,hf,kernels --json "$out/small.json"

if [ -f "$out/main_job.json" ]; then
  python - "$out/main_job.json" <<'EOF2'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"main job: {s['status']}, {s['steps']} steps, val loss {s['final_val_loss']}, "
      f"{s['tokens_per_sec']:,.0f} tokens/s over {s['wall_time_s']:.0f} s, "
      f"{len(s['samples'])} samples")
EOF2
else
  echo "gpu_check: the main job did not finish" >&2
  failed=1
fi

reports=()
for f in "$out/big.json" "$out/small.json"; do
  [ -f "$f" ] && reports+=("$f")
done
echo
if [ "${#reports[@]}" -gt 0 ]; then
  python -m tools.bench --table "${reports[@]}"
else
  echo "gpu_check: no benchmark finished" >&2
  failed=1
fi
exit "$failed"
