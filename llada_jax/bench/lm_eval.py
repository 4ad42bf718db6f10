"""The `lm_eval` section: lm-evaluation-harness generate_until through the `llada_jax` model, one
lm-eval pass per sampler variant over the same task, timed in turn.

Needs `--checkpoint` (a trained run: accuracy means nothing on random weights), lm-eval (the `eval`
extra) and the task's data: `--lm_eval_task` names a task of llada_jax/harness/tasks (default
`llada_demo`, the demo's word problems) whose test file is replaced by `--task_data` when given.
The sampler settings come from the sampling section's flags (`--gen_length`, `--block_length`,
`--steps`, `--threshold`, `--temperature`, `--eval_batch_size`), and `--variants` picks the samplers
(exact, prefix, dual, threshold, dual+threshold).

Each variant first runs one untimed pass (its compilations: one per prompt-length bucket), then the
variants' timed passes alternate, `--repeats` rounds, so their ratios hold when the machine's load
changes. A pass is lm-eval's whole `simple_evaluate` of the task with the model already loaded;
`generate s` is the part spent inside the model's generate_until (sampling, tokenizing, cutting at
stop strings), the rest being lm-eval's own work (building requests, filters, metrics).
"""

from __future__ import annotations

import copy
import os
import time
import types
from typing import Any

from absl import flags

from llada_jax.bench import core, sampling as sampling_section

flags.DEFINE_string("lm_eval_task", "llada_demo", "a task of llada_jax/harness/tasks", flag_values=core.FLAGS)
flags.DEFINE_integer("lm_eval_limit", 200, "documents of the task per pass (0: all)", flag_values=core.FLAGS)


def _check(args: types.SimpleNamespace) -> None:
  if not args.checkpoint:
    raise ValueError("the lm_eval section needs --checkpoint: a trained run (random weights have no accuracy)")
  if args.lm_eval_limit < 0:
    raise ValueError(f"--lm_eval_limit={args.lm_eval_limit}: expected 0 (all) or a positive count")
  known = sampling_section.sampler_variants(args.threshold)
  if not args.variants or any(v not in known for v in args.variants):
    raise ValueError(f"--variants={','.join(args.variants)}: expected a subset of {','.join(known)}")


def task_config(args: types.SimpleNamespace) -> dict[str, Any]:
  """The task's YAML as a dict, its test data replaced by --task_data when given."""
  import yaml  # noqa: PLC0415 - lm-eval's dependency

  from llada_jax.harness.__main__ import TASKS_DIR  # noqa: PLC0415

  path = os.path.join(TASKS_DIR, f"{args.lm_eval_task}.yaml")
  if not os.path.isfile(path):
    shipped = sorted(f[:-5] for f in os.listdir(TASKS_DIR) if f.endswith(".yaml"))
    raise ValueError(f"--lm_eval_task={args.lm_eval_task}: expected one of {', '.join(shipped)}")
  with open(path, encoding="utf-8") as f:
    config = yaml.safe_load(f)
  if args.task_data:
    config = copy.deepcopy(config)
    config["dataset_kwargs"]["data_files"]["test"] = os.path.abspath(args.task_data)
  return config


def model_args(args: types.SimpleNamespace, variant: str) -> dict[str, Any]:
  sampler = sampling_section.sampler_variants(args.threshold)[variant]
  out = dict(checkpoint=args.checkpoint, gen_length=args.gen_length, block_length=args.block_length,
             steps=args.steps, temperature=args.temperature, batch_size=args.eval_batch_size, seed=args.seed,
             cache=sampler["cache"] or "none",
             mc_num=args.eval_batch_size)  # unused by generate_until; a multiple of batch_size, as checked
  if sampler["threshold"] is not None:
    out["threshold"] = sampler["threshold"]
  if args.step is not None:
    out["step"] = args.step
  return out


class _Timed:
  """Wraps a model's generate_until to add up the seconds spent in it."""

  def __init__(self, lm):
    self.lm, self.seconds = lm, 0.0
    inner = lm.generate_until

    def generate_until(requests, *a, **k):
      start = time.perf_counter()
      try:
        return inner(requests, *a, **k)
      finally:
        self.seconds += time.perf_counter() - start

    lm.generate_until = generate_until


def _score(results: dict, task: str) -> float:
  metrics = results["results"][task]
  key = next(k for k in metrics if k.startswith("exact_match,"))
  return float(metrics[key])


def _prepare(args, variant: str, config: dict):
  """(the timed model, pass()) of one variant: pass() -> (seconds, generate seconds, accuracy, documents)."""
  # The task's data is a local file: nothing is to be fetched (read when `datasets` is first imported).
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import lm_eval  # noqa: PLC0415

  from llada_jax.harness import model as harness_model  # noqa: PLC0415

  timed = _Timed(harness_model.LLaDAJaxLM(**model_args(args, variant)))
  limit = args.lm_eval_limit or None

  def one_pass():
    before = timed.seconds
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=timed.lm, tasks=[copy.deepcopy(config)], limit=limit,
                                      log_samples=False, verbosity="WARNING")
    seconds = time.perf_counter() - start
    task = config["task"]
    documents = results.get("n-samples", {}).get(task, {}).get("effective")
    return seconds, timed.seconds - before, _score(results, task), documents

  return one_pass


@core.register("lm_eval", check=_check, columns=(
    core.Column("task", "task"),
    core.Column("variant", "variant"),
    core.Column("docs", "documents"),
    core.Column("s/pass", "median_s", "{:.2f}"),
    core.Column("generate s", "generate_s", "{:.2f}"),
    core.Column("speed-up (pass)", "speedup_pass", "{:.2f}x"),
    core.Column("speed-up (generate)", "speedup_generate", "{:.2f}x"),
    core.Column("exact_match", "accuracy", "{:.3f}"),
    core.Column("points vs exact", "points_vs_exact", "{:+.1f}"),
    core.Column("warm-up s", "warmup_s", "{:.1f}"),
))
def bench_lm_eval(ctx: core.Context) -> list[core.Result]:
  """lm-eval generate_until passes of a trained run per sampler variant."""
  args = ctx.args
  _check(args)
  config = task_config(args)
  passes, warm = {}, {}
  for variant in args.variants:
    passes[variant] = _prepare(args, variant, config)
    warm[variant] = passes[variant]()
    print(f"lm_eval {variant}: warm-up pass {warm[variant][0]:.1f} s", flush=True)
  runs: dict[str, list] = {v: [] for v in args.variants}
  for _ in range(args.repeats):
    for variant in args.variants:
      runs[variant].append(passes[variant]())
  results = []
  for variant in args.variants:
    settings = {"task": config["task"], "variant": variant, **model_args(args, variant)}
    result = core.Result("lm_eval", f"{config['task']}/{variant}", settings, [r[0] for r in runs[variant]],
                         [warm[variant][0]])
    generate = sorted(r[1] for r in runs[variant])
    result.metrics = {"generate_s": generate[len(generate) // 2], "accuracy": runs[variant][-1][2],
                      "documents": runs[variant][-1][3], "warmup_s": warm[variant][0],
                      "accuracy_per_pass": [r[2] for r in runs[variant]]}
    results.append(result)
  exact = next((r for r in results if r.settings["variant"] == "exact"), None)
  for result in results:
    if exact is not None:
      result.metrics["speedup_pass"] = exact.median_s / result.median_s
      result.metrics["speedup_generate"] = exact.metrics["generate_s"] / result.metrics["generate_s"]
      result.metrics["points_vs_exact"] = 100 * (result.metrics["accuracy"] - exact.metrics["accuracy"])
  return results
