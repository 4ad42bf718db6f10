"""The `data` section: building the SFT and preference sources and reading one epoch of their batches, from the
same records written as JSONL and as Parquet: records/s of each and the Parquet/JSONL ratio.

The records are `--data_records` problems of the demo task (prompt/response; a preference pair takes another
problem's response as its rejected answer), tokenized by a sentencepiece model trained on them first (offline,
untimed). Each timed call is what a training run does before its first step and then through one epoch:
`pipelines.make_dataset` (read, validate, tokenize every record) and iterating every batch (shuffled, padded,
`--data_batch_size` rows of `--data_seq_len`). The formats are timed in turn, one call of each per round, so
their ratio holds when the machine's load changes (the first of the two alternates). Apart, each round also
times reading every record alone (`read s`: parsed, not tokenized), the part of the build the format changes;
tokenization, the same for both, is most of the rest. No model is built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
import types

from absl import flags

from llada_jax.bench import core

KINDS = ("sft", "preference")
FORMATS = ("jsonl", "parquet")

core.define_list("data_kinds", KINDS, "comma-separated among sft,preference", choices=KINDS)
flags.DEFINE_integer("data_records", 20000, "records per data file of the data section", flag_values=core.FLAGS)
flags.DEFINE_integer("data_batch_size", 32, "rows per batch of the data section", flag_values=core.FLAGS)
flags.DEFINE_integer("data_seq_len", 256, "row length of the data section (longer examples are truncated)",
                     flag_values=core.FLAGS)
flags.DEFINE_integer("data_row_group", 4096, "Parquet row-group size of the data section", flag_values=core.FLAGS)


def _check_data(args: types.SimpleNamespace) -> None:
  if importlib.util.find_spec("pyarrow") is None:
    raise ValueError("the data section writes Parquet, which needs pyarrow; expected it installed "
                     "(pip install llada_jax[data]), or the section left out of --only")
  if not args.data_kinds or any(k not in KINDS for k in args.data_kinds):
    raise ValueError(f"--data_kinds={','.join(args.data_kinds)}: expected a subset of {','.join(KINDS)}")
  if args.data_batch_size < 1 or args.data_records < args.data_batch_size:
    raise ValueError(f"--data_records={args.data_records}, --data_batch_size={args.data_batch_size}: expected "
                     "0 < batch size <= records")
  if args.data_seq_len < 2 or args.data_row_group < 1:
    raise ValueError(f"--data_seq_len={args.data_seq_len}, --data_row_group={args.data_row_group}: expected "
                     "seq_len >= 2 and a positive row group")


def records(kind: str, n: int, seed: int) -> list[dict[str, str]]:
  """`n` SFT (prompt, response) or preference (prompt, chosen, rejected) records of the demo task."""
  from llada_jax.data import demo_task  # noqa: PLC0415

  problems = demo_task.make_split("train", n, seed=seed)
  if kind == "sft":
    return [{"prompt": p["prompt"], "response": p["response"]} for p in problems]
  # The next problem's worked answer that differs from this one's: an answer to the wrong question.
  def rejected(i):
    return next(q["response"] for q in problems[i + 1:] + problems[:i] if q["response"] != problems[i]["response"])
  return [{"prompt": p["prompt"], "chosen": p["response"], "rejected": rejected(i)} for i, p in enumerate(problems)]


def write_files(directory: str, name: str, rows: list[dict[str, str]], row_group: int) -> dict[str, str]:
  """The rows as `name.jsonl` and `name.parquet` in `directory`; format -> path."""
  import pyarrow as pa  # noqa: PLC0415
  import pyarrow.parquet as pq  # noqa: PLC0415

  paths = {fmt: os.path.join(directory, f"{name}.{fmt}") for fmt in FORMATS}
  with open(paths["jsonl"], "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
  pq.write_table(pa.table({k: [row[k] for row in rows] for k in rows[0]}), paths["parquet"],
                 row_group_size=row_group)
  return paths


def read_seconds(path: str) -> float:
  """Seconds to read every record of `path` (parsed, not tokenized): the part of the build the format changes."""
  from llada_jax.data import readers  # noqa: PLC0415

  start = time.perf_counter()
  for _ in readers.iter_records(path):
    pass
  return time.perf_counter() - start


def _epoch(kind: str, path: str, tokenizer, args: types.SimpleNamespace) -> tuple[float, float, int]:
  """(build seconds, iterate seconds, batches) of one pipeline over one epoch."""
  from llada_jax.data import pipelines  # noqa: PLC0415

  start = time.perf_counter()
  pipeline = pipelines.make_dataset(kind, path, tokenizer, seq_len=args.data_seq_len,
                                    per_process_batch_size=args.data_batch_size, seed=args.seed, num_epochs=1,
                                    process_index=0, process_count=1, on_too_long="truncate")
  built = time.perf_counter()
  batches = sum(1 for _ in pipeline)
  return built - start, time.perf_counter() - built, batches


def _bench_kind(kind: str, directory: str, tokenizer, args: types.SimpleNamespace) -> list[core.Result]:
  paths = write_files(directory, kind, records(kind, args.data_records, args.seed), args.data_row_group)
  runs = {fmt: [] for fmt in FORMATS}
  reads = {fmt: [] for fmt in FORMATS}
  for rnd in range(args.warmup + args.repeats):
    # Alternating which format goes first, so neither always follows the other's threads winding down.
    for fmt in FORMATS[::-1] if rnd % 2 else FORMATS:
      reads[fmt].append(read_seconds(paths[fmt]))
      runs[fmt].append((rnd < args.warmup, _epoch(kind, paths[fmt], tokenizer, args)))
  results = []
  for fmt in FORMATS:
    timed = [t for warm, t in runs[fmt] if not warm]
    result = core.Result("data", f"{kind}/{fmt}", {
        "kind": kind, "format": fmt, "records": args.data_records, "seq_len": args.data_seq_len,
        "batch_size": args.data_batch_size, "file_mb": os.path.getsize(paths[fmt]) / 1e6,
    }, [b + i for b, i, _ in timed], [b + i for warm, (b, i, _) in runs[fmt] if warm])
    build = sorted(b for b, _, _ in timed)[len(timed) // 2]
    read = sorted(reads[fmt][args.warmup:])[len(timed) // 2]
    result.metrics = {"records_per_s": args.data_records / result.median_s, "build_s": build, "read_s": read,
                      "build_records_per_s": args.data_records / build, "batches": timed[0][2]}
    results.append(result)
  jsonl, parquet = results
  parquet.metrics["vs_jsonl"] = parquet.metrics["records_per_s"] / jsonl.metrics["records_per_s"]
  parquet.metrics["read_vs_jsonl"] = jsonl.metrics["read_s"] / parquet.metrics["read_s"]
  jsonl.metrics["vs_jsonl"] = jsonl.metrics["read_vs_jsonl"] = 1.0
  for r in results:
    print(f"data {r.name}: {r.metrics['records_per_s']:.0f} records/s ({r.median_s:.2f} s)", flush=True)
  return results


@core.register("data", check=_check_data, columns=(
    core.Column("kind", "kind"),
    core.Column("format", "format"),
    core.Column("records", "records", "{:,}"),
    core.Column("file MB", "file_mb", "{:.1f}"),
    core.Column("batches", "batches"),
    core.Column("s/epoch", "median_s", "{:.2f}"),
    core.Column("iqr s", "iqr_s", "{:.2f}"),
    core.Column("read s", "read_s", "{:.3f}"),
    core.Column("read vs JSONL", "read_vs_jsonl", "{:.2f}x"),
    core.Column("build s", "build_s", "{:.2f}"),
    core.Column("records/s", "records_per_s", "{:,.0f}"),
    core.Column("build records/s", "build_records_per_s", "{:,.0f}"),
    core.Column("vs JSONL", "vs_jsonl", "{:.2f}x"),
))
def bench_data(ctx: core.Context) -> list[core.Result]:
  """SFT and preference sources and one epoch of batches, Parquet against JSONL on the same records."""
  from llada_jax.data import tokenizer as tokenizer_lib  # noqa: PLC0415

  args = ctx.args
  _check_data(args)
  results = []
  with tempfile.TemporaryDirectory(prefix="llada_jax_bench_data_") as directory:
    corpus = os.path.join(directory, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
      f.writelines(r["prompt"] + r["response"] + "\n" for r in records("sft", 2000, args.seed + 1))
    tokenizer = tokenizer_lib.train_sentencepiece([corpus], os.path.join(directory, "tok"), vocab_size=512)
    for kind in args.data_kinds:
      results += _bench_kind(kind, directory, tokenizer, args)
  return results
