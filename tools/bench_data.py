"""Benchmark the data pipeline: preparation against `datasets`, and loader read throughput.

    pretrain-bench-data --workers 2 --reps 3

Preparation: our `prepare` (read, tokenize in N processes, write shards) and
`datasets.load_dataset("json") + Dataset.map(batched=True, num_proc=N)` with the same
SentencePiece tokenizer (EOS appended) on the same JSONL file, alternated in one run; both
produce the same number of tokens (checked). Reported per pipeline: wall time, tokens/s,
tokens/s per worker, and tokens per CPU-second (the processes' own CPU time, which a machine
shared with other jobs distorts less than wall time). Loader: batches/s from shards in the page
cache for one process, without and with prefetch threads and document masking, and the share
of step time spent waiting for data with a simulated (GPU-bound) step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pretrain.data.loader import ShardedWindowLoader
from pretrain.data.prepare import prepare, train_tokenizer_from_source
from pretrain.data.shards import write_manifest, write_shard
from pretrain.data.sources import iter_documents
from pretrain.data.tokenizer import EOS_ID, Tokenizer
from pretrain.errors import DataError


@dataclass
class Timing:
    """One measured run of a pipeline."""

    wall_s: float
    cpu_s: float
    tokens: int


def cpu_seconds() -> float:
    """CPU time of this process and of its finished (waited-for) children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], int]) -> Timing:
    wall, cpu = time.perf_counter(), cpu_seconds()
    tokens = fn()
    return Timing(time.perf_counter() - wall, cpu_seconds() - cpu, tokens)


# ---------------------------------------------------------------------------------------------
# preparation


def make_corpus(source: str, max_bytes: int, path: str) -> str:
    """A JSONL file both pipelines read: `source` itself when it is one, else its first
    `max_bytes` written out."""
    if source.endswith(".jsonl") and os.path.isfile(source):
        return source
    with open(path, "w", encoding="utf-8") as f:
        for doc in iter_documents(source, max_bytes=max_bytes):
            f.write(json.dumps({"text": doc}) + "\n")
    return path


def run_ours(corpus: str, tokenizer: str, out: str, workers: int) -> int:
    shutil.rmtree(out, ignore_errors=True)
    manifest = prepare(corpus, tokenizer, out, num_workers=workers, resume=False)
    return int(manifest["n_tokens"])


_hf_tokenizer: Tokenizer | None = None


def _hf_tokenize(batch: dict[str, list[str]], tokenizer_path: str) -> dict[str, Any]:
    global _hf_tokenizer
    if _hf_tokenizer is None:  # once per map worker process
        _hf_tokenizer = Tokenizer.load(tokenizer_path)
    return {"input_ids": _hf_tokenizer.encode_batch(batch["text"], eos=True)}


def run_datasets(corpus: str, tokenizer: str, cache: str, workers: int) -> int:
    import datasets

    shutil.rmtree(cache, ignore_errors=True)
    datasets.disable_progress_bars()
    ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
    out = ds.map(_hf_tokenize, batched=True, num_proc=workers, remove_columns=ds.column_names,
                 fn_kwargs={"tokenizer_path": tokenizer})
    return int(sum(len(ids) for ids in out.with_format("numpy")["input_ids"]))


def bench_prepare(corpus: str, tokenizer: str, workdir: str, workers: int,
                  reps: int) -> dict[str, list[Timing]]:
    runs: dict[str, list[Timing]] = {"ours": [], "datasets": []}
    for _ in range(reps):  # alternated, so both see the same machine load
        runs["ours"].append(timed(lambda: run_ours(corpus, tokenizer,
                                                   os.path.join(workdir, "ours"), workers)))
        runs["datasets"].append(timed(lambda: run_datasets(
            corpus, tokenizer, os.path.join(workdir, "hf-cache"), workers)))
    ours, theirs = runs["ours"][0].tokens, runs["datasets"][0].tokens
    if ours != theirs:
        raise DataError(f"the pipelines disagree: {ours} tokens (ours) vs {theirs} (datasets)")
    return runs


def prepare_table(runs: dict[str, list[Timing]], workers: int) -> tuple[str, dict[str, Any]]:
    names = {"ours": "pretrain prepare", "datasets": f"datasets map num_proc={workers}"}
    header = (f"{'pipeline':<28} {'wall s':>7} {'tokens/s':>12} {'tok/s/worker':>13} "
              f"{'CPU s':>7} {'tok/CPU-s':>11}")
    lines, summary = [header, "-" * len(header)], {}
    for key, timings in runs.items():
        best = min(timings, key=lambda t: t.wall_s)
        rate = best.tokens / best.wall_s
        per_cpu = statistics.median(t.tokens / t.cpu_s for t in timings)
        summary[key] = {"tokens_per_s": rate, "tokens_per_s_per_worker": rate / workers,
                        "tokens_per_cpu_s": per_cpu, "runs": [asdict(t) for t in timings]}
        lines.append(f"{names[key]:<28} {best.wall_s:>7.2f} {rate:>12,.0f} "
                     f"{rate / workers:>13,.0f} {best.cpu_s:>7.2f} {per_cpu:>11,.0f}")
    ratio = summary["ours"]["tokens_per_s"] / summary["datasets"]["tokens_per_s"]
    cpu_ratio = summary["ours"]["tokens_per_cpu_s"] / summary["datasets"]["tokens_per_cpu_s"]
    lines.append(f"{'ours / datasets':<28} {'':>7} {ratio:>11.2f}x {ratio:>12.2f}x {'':>7} "
                 f"{cpu_ratio:>10.2f}x")
    return "\n".join(lines), summary


# ---------------------------------------------------------------------------------------------
# loader


def synthetic_shards(path: str, n_tokens: int, vocab: int = 32000,
                     shard_tokens: int = 1 << 22) -> str:
    """Random tokens in documents of ~1000 tokens: the loader's speed does not depend on what
    the tokens are."""
    rng = np.random.default_rng(0)
    shards = []
    for i, lo in enumerate(range(0, n_tokens, shard_tokens)):
        n = min(shard_tokens, n_tokens - lo)
        tokens = rng.integers(4, vocab, size=n).astype(np.uint16)
        ends = np.unique(np.append(rng.integers(1, n, size=max(1, n // 1000)), n))
        tokens[ends - 1] = EOS_ID
        name = f"train/{i:06d}.bin"
        checksum = write_shard(os.path.join(path, name), tokens, ends, vocab_size=vocab)
        shards.append({"name": name, "n_tokens": n, "n_docs": len(ends), "checksum": checksum})
    write_manifest(path, {"format": "pretrain-shards", "version": 1, "vocab_size": vocab,
                          "tokenizer": {"file": "none", "fingerprint": "synthetic"},
                          "splits": {"train": {"n_tokens": n_tokens, "shards": shards}}})
    return path


LOADER_MODES: dict[str, dict[str, Any]] = {
    "read in the loop": {},
    "2 prefetch threads": {"num_workers": 2},
    "in the loop + document masking": {"document_masking": True},
    "2 threads + masking + positions": {"num_workers": 2, "document_masking": True,
                                        "restart_positions": True},
}


def bench_loader(data: str, seq_len: int, micro_batch_size: int, batches: int,
                 reps: int) -> dict[str, float]:
    """Best tokens/s of each mode over `reps` passes of `batches` batches."""
    loaders = {mode: ShardedWindowLoader(data, seq_len=seq_len, micro_batch_size=micro_batch_size,
                                         vocab_size=32000, **kw)
               for mode, kw in LOADER_MODES.items()}
    best = dict.fromkeys(loaders, 0.0)
    for _ in range(reps):
        for mode, loader in loaders.items():
            loader.next_batch()  # starts the threads outside the timing
            start = time.perf_counter()
            for _ in range(batches):
                loader.next_batch()
            rate = batches * micro_batch_size * seq_len / (time.perf_counter() - start)
            best[mode] = max(best[mode], rate)
    for loader in loaders.values():
        loader.close()
    return best


def bench_data_wait(data: str, seq_len: int, micro_batch_size: int, step_s: float,
                    steps: int) -> dict[int, dict[str, float]]:
    """Time spent in next_batch when each step also spends `step_s` away from the CPU
    (sleeping, like a step waiting on the GPU), for 0 and 2 prefetch threads: the median wall
    time per batch, its share of the step, and the training thread's own CPU time per batch
    (what the loader costs the training loop; wall time adds scheduling delays of a busy
    machine)."""
    out = {}
    for workers in (0, 2):
        loader = ShardedWindowLoader(data, seq_len=seq_len, micro_batch_size=micro_batch_size,
                                     vocab_size=32000, num_workers=workers,
                                     document_masking=True)
        loader.next_batch()
        waits, cpu = [], []
        for _ in range(steps):
            t, c = time.perf_counter(), time.thread_time()
            loader.next_batch()
            waits.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
            time.sleep(step_s)
        median = statistics.median(waits)
        out[workers] = {"median_wait_s": median, "share": median / (median + step_s),
                        "median_thread_cpu_s": statistics.median(cpu)}
        loader.close()
    return out


def loader_table(rates: dict[str, float], waits: dict[int, dict[str, float]],
                 step_ms: float) -> str:
    lines = [f"{'loader mode (1 process)':<34} {'tokens/s':>14}", "-" * 49]
    lines += [f"{mode:<34} {rate:>14,.0f}" for mode, rate in rates.items()]
    lines.append(f"data wait per batch with a {step_ms:g} ms step (masking on), wall / "
                 "training-thread CPU:")
    lines += [f"  {w} threads: {v['median_wait_s'] * 1e6:,.0f} us ({v['share']:.2%} of the "
              f"step) / {v['median_thread_cpu_s'] * 1e6:,.0f} us" for w, v in waits.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source", default="builtin", help="corpus (a .jsonl file is used as is)")
    p.add_argument("--max-bytes", type=int, default=12_000_000, help="corpus bytes to use")
    p.add_argument("--tokenizer", help="SentencePiece model (default: train one, vocab 8192)")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes (both sides)")
    p.add_argument("--reps", type=int, default=3, help="alternated repetitions")
    p.add_argument("--loader-tokens", type=int, default=1 << 25, help="synthetic shard tokens")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--loader-batches", type=int, default=200)
    p.add_argument("--step-ms", type=float, default=50.0, help="simulated step time")
    p.add_argument("--skip-prepare", action="store_true", help="only the loader benchmark")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as workdir:
        try:
            results = run(args, workdir)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    results["load_average_after"] = os.getloadavg()
    print(f"load average after: {results['load_average_after']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


def run(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    results: dict[str, Any] = {"cpus": os.cpu_count(), "load_average": os.getloadavg()}
    if not args.skip_prepare:
        corpus = make_corpus(args.source, args.max_bytes, os.path.join(workdir, "corpus.jsonl"))
        tokenizer = args.tokenizer or train_tokenizer_from_source(
            corpus, os.path.join(workdir, "tok.model"), vocab_size=8192, sample_bytes=2_000_000)
        runs = bench_prepare(corpus, tokenizer, workdir, args.workers, args.reps)
        table, results["prepare"] = prepare_table(runs, args.workers)
        print(f"\npreparation of {os.path.getsize(corpus) / 1e6:.1f} MB of JSONL "
              f"({runs['ours'][0].tokens:,} tokens), {args.workers} workers, "
              f"best of {args.reps} alternated runs:\n{table}\n", flush=True)
    data = synthetic_shards(os.path.join(workdir, "shards"), args.loader_tokens)
    for name in sorted(os.listdir(os.path.join(data, "train"))):  # into the page cache
        with open(os.path.join(data, "train", name), "rb") as f:
            while f.read(1 << 24):
                pass
    rates = bench_loader(data, args.seq_len, args.micro_batch_size, args.loader_batches,
                         args.reps)
    waits = bench_data_wait(data, args.seq_len, args.micro_batch_size, args.step_ms / 1000,
                            steps=max(20, args.loader_batches // 4))
    results["loader"] = {"tokens_per_s": rates, "data_wait_share": waits,
                         "seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size}
    print(f"loader: seq_len {args.seq_len}, micro-batch {args.micro_batch_size}, "
          f"{args.loader_tokens / 1e6:.0f}M tokens in the page cache, best of {args.reps}:\n"
          f"{loader_table(rates, waits, args.step_ms)}")
    return results


if __name__ == "__main__":
    sys.exit(main())
