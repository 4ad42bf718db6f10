"""The demo chain behind `python -m llada_jax.demo`: the LLaDA 1.5 recipe in miniature, offline on a CPU: generate the shipped arithmetic task, train a
tokenizer, pretrain a mask predictor, supervise-fine-tune it, sample answers from the SFT model,
verify them and pair a correct with an incorrect one, align with VRPO and with the naive-DPO
baseline (several seeds), and evaluate every model on the held-out test split.

Every stage writes its outputs under the workdir and is skipped when they exist (training stages
resume from their checkpoints), so running the same command again continues where it stopped.
Training goes through `llada_jax.training.loop.run` with the shipped recipes `demo_*`; the CLIs
(`llada_jax.train`, `llada_jax.generate`, `llada_jax.evaluate`) can run any stage alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import random
import time

import jax
import numpy as np
from absl import logging

from llada_jax import configs
from llada_jax.bench import timing
from llada_jax.recipes import plots, progress as progress_lib
from llada_jax.storage import checkpoint as ckpt_lib, files
from llada_jax.training import loop
from llada_jax.data import demo_task
from llada_jax.data import tokenizer as tok_lib
from llada_jax.eval import generation
from llada_jax.sampling import SamplerConfig

@dataclasses.dataclass(frozen=True)
class Recipe:
  """Sizes of one demo run: `LEAN` is the default, `FULL` the longer recipe of the earlier tables
  (docs/demo.md), `SMOKE` a seconds-long version for tests."""

  name: str = "full"  # kept in the workdir: a resume continues with the recipe that started it
  level: str = "easy"
  n_train: int = 20000
  n_validation: int = 200
  n_test: int = 1000
  vocab_size: int = 1024
  pretrain_steps: int | None = None  # None: the config file's value
  sft_steps: int | None = None
  vrpo_steps: int | None = None
  pref_prompts: int = 768  # training prompts the SFT model answers to build preference pairs
  samples_per_prompt: int = 8
  pairs_per_prompt: int = 3  # distinct (correct, incorrect) pairs taken from one prompt's samples
  pair_temperature: float = 0.8
  # When a prompt has no right (or no usable wrong) sample, stand in the worked solution (or it with
  # a wrong final answer): only for the smoke run, whose barely trained model is never right.
  gold_fallback: bool = False
  seeds: tuple = (0, 1, 2)
  eval_batch: int = 50
  table2: tuple = (("n_pairs", 8), ("batch_size", 8), ("n_repeats", 16))
  model_overrides: tuple = ()  # (field, value) pairs applied to every stage's model
  optimizer_overrides: tuple = ()  # (field, value) pairs applied to every stage's optimizer
  stage_overrides: tuple = ()  # (stage, "section.field", value) applied to one stage, after the others
  prior_seconds: tuple = ()  # (kind, seconds per unit): this recipe's entries of PRIOR_SECONDS
  seq_len: int | None = None  # None: the config files' value
  dtype: str | None = None  # compute dtype of every stage; None: the config files' value (`choose_dtype`)
  # Up to 32 answer tokens in two semi-autoregressive blocks, dual KV cache and confidence-
  # threshold decoding (as accurate as the exact sampler on the demo SFT model, several times faster).
  gen_length: int = 32
  block_length: int = 16
  steps: int = 32
  cache: str = "dual"
  threshold: float | None = 0.9


FULL = Recipe()
SMOKE = Recipe(name="smoke", n_train=200, n_validation=8, n_test=16, vocab_size=320, pretrain_steps=3, sft_steps=3, vrpo_steps=2,
               pref_prompts=16, samples_per_prompt=2, gold_fallback=True, seeds=(0,), eval_batch=16,
               table2=(("n_pairs", 8), ("batch_size", 4), ("n_repeats", 2)),
               model_overrides=(("d_model", 64), ("n_layers", 2), ("n_heads", 4), ("mlp_hidden_size", 128),
                                ("vocab_size", 320)),
               stage_overrides=tuple((stage, "data.global_batch_size", 8) for stage in ("pretrain", "sft", "vrpo")),
               optimizer_overrides=(("warmup_steps", 0),), seq_len=160,
               gen_length=16, block_length=8, steps=8)
# The default: the same chain on a 1.8M-parameter model, a short pretraining stage and a faster SFT
# schedule, chosen by the measurements in docs/demo.md ("How the lean recipe was chosen"). The smaller
# model needs a larger alignment step: at FULL's 2e-5 neither method moved it.
LEAN = Recipe(name="lean", pretrain_steps=200, sft_steps=2000,
              model_overrides=(("d_model", 128), ("n_layers", 6), ("n_heads", 4), ("mlp_hidden_size", 512)),
              stage_overrides=(("sft", "optimizer.lr", 1.5e-3), ("vrpo", "optimizer.lr", 1e-4)),
              # Seconds per unit measured on a 2-core CPU without native bfloat16, in float32.
              prior_seconds=(("data", 2.0), ("pretrain", 0.40), ("sft", 0.345), ("pairs", 0.0112), ("eval", 0.012),
                             ("vrpo", 2.6), ("naive_dpo", 1.3), ("table2", 19.7)))
RECIPES = {"lean": LEAN, "full": FULL, "smoke": SMOKE}
RECIPE_FLAGS = {"lean": "no recipe flag", "full": "--full", "smoke": "--smoke"}


def _recipe_config(name: str, arg: str | None):
  """The shipped recipe `demo_NAME[:ARG]`."""
  return configs.load(f"demo_{name}" + (f":{arg}" if arg else ""))


def _config_dtype() -> str:
  """The compute dtype the recipe's config files give every stage."""
  return _recipe_config("pretrain", None).model.dtype


def _stage_config(recipe: Recipe, name: str, arg: str | None, workdir: pathlib.Path, files, tokenizer: str,
                  steps: int | None, seed: int = 0):
  config = _recipe_config(name, arg)
  config.workdir = str(workdir)
  config.data.train_files = tuple(str(f) for f in files)
  config.data.tokenizer = tokenizer
  config.seed = seed
  if steps is not None:
    config.total_steps = steps
  for field, value in recipe.model_overrides:
    config.model[field] = value
  if recipe.seq_len is not None:
    config.data.seq_len = recipe.seq_len
  if recipe.dtype is not None:
    config.model.dtype = recipe.dtype
  for field, value in recipe.optimizer_overrides:
    config.optimizer[field] = value
  for stage, path, value in recipe.stage_overrides:
    if stage == name:
      section, field = path.split(".")
      config[section][field] = value
  config.logging.progress_bar = False
  return config


def _train(config, on_progress=None) -> pathlib.Path:
  t = time.perf_counter()
  result = loop.run(config, on_progress=on_progress)
  logging.info("%s: step %d in %.0f s", config.workdir, result.final_step, time.perf_counter() - t)
  return pathlib.Path(config.workdir)


def sampler_config(recipe: Recipe, temperature: float = 0.0) -> SamplerConfig:
  return SamplerConfig(gen_length=recipe.gen_length, block_length=recipe.block_length, steps=recipe.steps,
                       temperature=temperature, cache=recipe.cache, threshold=recipe.threshold)


def build_preference_pairs(run_dir, tokenizer, examples, recipe: Recipe, key, out_path: pathlib.Path,
                           on_batch=None) -> dict:
  """Samples answers from the model, verifies them, and pairs a correct with an incorrect one.

  A prompt contributes up to `recipe.pairs_per_prompt` pairs, its i-th distinct correct sample (right
  answer, true working) with its i-th distinct wrong answer, so prompts the model always or never solves give none.
  """
  model_cfg, params, _ = ckpt_lib.load_model(run_dir)
  k = recipe.samples_per_prompt
  repeated = [ex for ex in examples for _ in range(k)]
  out = generation.evaluate_generation(params, model_cfg, tokenizer, repeated,
                                       sampler_config(recipe, recipe.pair_temperature), key,
                                       batch_size=recipe.eval_batch, verifier=demo_task.verify, on_batch=on_batch)
  pairs, solved = [], 0
  for i, ex in enumerate(examples):
    records = out["records"][i * k:(i + 1) * k]
    # Chosen: the right answer reached by a chain of true equations. Most of the SFT model's right
    # answers come after wrong working ("7 - 5 = 3. #### 3"); preferring those teaches wrong
    # arithmetic, and VRPO on such pairs lowered test accuracy (docs/demo.md).
    good = list(dict.fromkeys(r["completion"] for r in records
                              if r["correct"] and demo_task.verify_steps(r["completion"])))
    # An empty answer is wrong, but the data pipeline refuses empty fields.
    bad = list(dict.fromkeys(r["completion"] for r in records if not r["correct"] and r["completion"].strip()))
    solved += bool(good)
    if recipe.gold_fallback:
      good = good or [ex["response"]]
      bad = bad or [ex["response"].rsplit("####", 1)[0] + f"#### {ex['answer'] + 1}"]
    for chosen, rejected in list(zip(good, bad))[:recipe.pairs_per_prompt]:
      pairs.append({"prompt": ex["prompt"], "chosen": chosen, "rejected": rejected})
  files.write_text_atomic(out_path, "".join(json.dumps(p) + "\n" for p in pairs))
  return {"prompts": len(examples), "samples": len(repeated), "sample_accuracy": out["accuracy"],
          "prompts_with_a_correct_sample": solved, "pairs": len(pairs)}


def evaluate_run(run_dir, tokenizer, examples, recipe: Recipe, out_path: pathlib.Path, on_batch=None) -> dict:
  if out_path.exists():
    cached = json.loads(out_path.read_text())
    if "correct" in cached:  # older results lack the per-problem list the paired tests need
      return cached
  model_cfg, params, _ = ckpt_lib.load_model(run_dir)
  t = time.perf_counter()
  out = generation.evaluate_generation(params, model_cfg, tokenizer, examples, sampler_config(recipe),
                                       jax.random.key(0), batch_size=recipe.eval_batch,
                                       verifier=demo_task.verify, on_batch=on_batch)
  result = {"accuracy": out["accuracy"], "n": out["n"], "seconds": time.perf_counter() - t,
            "steps_valid": float(np.mean([demo_task.verify_steps(r["completion"]) for r in out["records"]])),
            "correct": [r["correct"] for r in out["records"]],  # per test problem, for paired tests
            "records": out["records"][:20]}
  files.write_json_atomic(out_path, result)
  return result


def paired_test(base: list[bool], other: list[bool]) -> dict:
  """Exact McNemar test of two models scored on the same problems.

  Only the problems where they disagree carry information: `fixed` (base wrong, other right) and
  `broken` (the reverse). Under "equally accurate" each disagreement is a fair coin, so the two-sided
  p-value is twice the binomial tail of the smaller count (capped at 1). Far more sensitive than
  comparing two accuracies, whose binomial spread on 1000 problems (~0.013) swamps a 1-2 point gain.
  """
  if len(base) != len(other):
    raise ValueError(f"paired_test: {len(base)} vs {len(other)} results; expected the same problems")
  fixed = sum(1 for b, o in zip(base, other) if not b and o)
  broken = sum(1 for b, o in zip(base, other) if b and not o)
  n = fixed + broken
  tail = sum(math.comb(n, i) for i in range(min(fixed, broken) + 1)) / 2 ** n
  return {"fixed": fixed, "broken": broken, "p_value": min(1.0, 2 * tail)}


# Paper Table 2's sampling settings: (n_timesteps, masks_per_timestep, antithetic).
TABLE2_SETTINGS = ((4, 1, True), (1, 1, True), (8, 1, True), (1, 4, True), (2, 2, True), (4, 1, False))
PAPER_TABLE2 = {  # score / loss / gradient variance, LLaDA 8B (docs/method.md, "VRPO")
    (4, 1, True): (2.2, 3.1e-3, 2.5), (1, 1, True): (44.0, 8.7e-2, 13.0), (8, 1, True): (1.0, 2.6e-3, 1.6),
    (1, 4, True): (7.3, 3.2e-2, 4.7), (2, 2, True): (4.7, 7.3e-3, 2.5), (4, 1, False): (2183.7, 62.0, 10.6)}


def variance_table(workdir, recipe: Recipe, *, policy: str, reference: str = "sft", n_pairs: int = 128,
                   batch_size: int = 16, n_repeats: int = 8, on_setting=None) -> list[dict]:
  """Paper Table 2 on the demo model: score, loss and gradient variance per sampling setting.

  The policy is an aligned model and the reference the SFT model, as in the paper; `n_pairs`
  preference pairs in batches of `batch_size`, each evaluated `n_repeats` times with fresh
  timesteps and masks. `on_setting(done)` is called after each sampling setting.
  """
  from llada_jax import model as model_lib, vrpo  # noqa: PLC0415
  from llada_jax.data import pipelines  # noqa: PLC0415

  workdir = pathlib.Path(workdir)
  model_cfg, policy_params, run_config = ckpt_lib.load_model(workdir / policy)
  _, reference_params, _ = ckpt_lib.load_model(workdir / reference)
  tokenizer = tok_lib.load_tokenizer(workdir / "tokenizer.model")
  source = pipelines.make_source("preference", [workdir / "preferences.jsonl"], tokenizer,
                                 seq_len=run_config["data"]["seq_len"], chat_template=False, on_too_long="skip")
  n = min(n_pairs, len(source)) // batch_size * batch_size
  if n == 0:
    raise ValueError(f"{workdir}/preferences.jsonl has {len(source)} pairs; expected at least {batch_size}")
  rows = [source[i] for i in range(n)]
  batches = [{k: np.stack([r[k] for r in rows[i:i + batch_size]]) for k in rows[0]}
             for i in range(0, n, batch_size)]
  logits = model_lib.logits_fn(model_cfg)
  table = []
  for n_t, n_yt, antithetic in TABLE2_SETTINGS:
    loss = vrpo.VRPOLoss(logits, model_cfg.mask_token_id,
                         vrpo.VRPOConfig(beta=run_config["vrpo"]["beta"], n_timesteps=n_t, masks_per_timestep=n_yt,
                                         antithetic=antithetic))
    out = vrpo.variance_diagnostics(loss, policy_params, reference_params, batches, jax.random.key(11),
                                    n_repeats=n_repeats)
    table.append({"n_timesteps": n_t, "masks_per_timestep": n_yt, "antithetic": antithetic, "pairs": n, **out,
                  "paper": dict(zip(("score_variance", "loss_variance", "gradient_variance"),
                                    PAPER_TABLE2[(n_t, n_yt, antithetic)]))})
    logging.info("Table 2 %s: %s", (n_t, n_yt, antithetic), out)
    if on_setting is not None:
      on_setting(len(table))
  return table


def format_variance_table(table: list[dict]) -> str:
  lines = ["| n_t, n_yt, antithetic | Var score | Var loss | Var gradient | paper (score / loss / grad) |",
           "| --- | --- | --- | --- | --- |"]
  for r in table:
    p = r["paper"]
    lines.append(f"| {r['n_timesteps']}, {r['masks_per_timestep']}, {'yes' if r['antithetic'] else 'no'} | "
                 f"{r['score_variance']:.3g} | {r['loss_variance']:.3g} | {r['gradient_variance']:.3g} | "
                 f"{p['score_variance']} / {p['loss_variance']} / {p['gradient_variance']} |")
  return "\n".join(lines)


# Seconds per unit of each kind of stage on a native-bfloat16 2-core host (docs/demo.md, "Timings"):
# the priors of the time-left estimate, rescaled by the speed measured on the host as the chain runs.
PRIOR_SECONDS = {"data": 10.0, "pretrain": 0.44, "sft": 0.43, "pairs": 0.0135, "eval": 0.015, "vrpo": 3.1,
                 "naive_dpo": 1.5, "table2": 23.0}


def _steps(recipe: Recipe, name: str, arg: str | None, steps: int | None) -> int:
  return steps if steps is not None else _recipe_config(name, arg).total_steps


def plan(recipe: Recipe) -> list[progress_lib.Stage]:
  """The chain's stages in the order `run_demo` runs them, with their sizes and prior costs."""
  prior = {**PRIOR_SECONDS, **dict(recipe.prior_seconds)}
  stages = [progress_lib.Stage("data", 1, "stage", prior["data"]),
            progress_lib.Stage("pretrain", _steps(recipe, "pretrain", None, recipe.pretrain_steps), "step",
                               prior["pretrain"]),
            progress_lib.Stage("sft", _steps(recipe, "sft", None, recipe.sft_steps), "step", prior["sft"]),
            progress_lib.Stage("pairs", recipe.pref_prompts * recipe.samples_per_prompt, "sample",
                               prior["pairs"]),
            progress_lib.Stage("eval_sft", recipe.n_test, "problem", prior["eval"])]
  for seed in recipe.seeds:
    for variant in ("vrpo", "naive_dpo"):
      stages += [progress_lib.Stage(f"{variant}_seed{seed}", _steps(recipe, "vrpo", variant, recipe.vrpo_steps),
                                    "step", prior[variant]),
                 progress_lib.Stage(f"eval_{variant}_seed{seed}", recipe.n_test, "problem", prior["eval"])]
  stages.append(progress_lib.Stage("table2", len(TABLE2_SETTINGS), "setting", prior["table2"]))
  return stages


def _record_dtype(workdir: pathlib.Path, recipe: Recipe) -> None:
  """Keeps the compute dtype a workdir's runs were trained in: resuming in another would mix models."""
  path = workdir / DTYPE_FILE
  dtype = recipe.dtype or _config_dtype()
  stored = read_dtype(workdir)
  if stored is not None and stored != dtype:
    raise ValueError(f"{path}: the runs in {workdir} compute in {stored}; expected the same dtype to resume "
                     f"(got {dtype}): pass --dtype {stored} or use a new --workdir")
  if stored is None:
    files.write_json_atomic(path, {"dtype": dtype})


RECIPE_FILE = "demo_recipe.json"


def _read_record(path: pathlib.Path, key: str, allowed, expected: str) -> str | None:
  """`key` of the workdir's JSON record at `path` (None when there is none), one of `allowed`;
  `expected` says which values those are, in the error line."""
  if not path.exists():
    return None
  try:
    value = json.loads(path.read_text())[key]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: unreadable ({e}); expected {{\"{key}\": {expected}}}") from None
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f"{path}: {key} {value!r}; expected {expected}")
  return value


def read_recipe(workdir) -> str | None:
  """The name of the recipe that made the runs in `workdir`, or None: a new workdir, or one from before
  the recipe was recorded (there each training stage's own resume check refuses another model)."""
  return _read_record(pathlib.Path(workdir) / RECIPE_FILE, "recipe", RECIPES, f"one of {', '.join(RECIPES)}")


def check_recipe(workdir, recipe: Recipe) -> str | None:
  """Refuses to resume a workdir with another recipe than the one that started it (the models would
  not match); returns the recipe recorded there, if any."""
  stored = read_recipe(workdir)
  if stored is not None and stored != recipe.name:
    raise ValueError(f"{pathlib.Path(workdir) / RECIPE_FILE}: the runs in {workdir} come from the {stored} recipe; "
                     f"expected the same recipe to resume them ({RECIPE_FLAGS[stored]}) or a new --workdir")
  return stored


def _record_recipe(workdir: pathlib.Path, recipe: Recipe) -> None:
  if check_recipe(workdir, recipe) is None:
    files.write_json_atomic(workdir / RECIPE_FILE, {"recipe": recipe.name})


def _tracked(progress, name: str, done: bool, work) -> None:
  """Runs `work(report)` unless `done`; `report(units_done, ...)` reports its progress."""
  if done:
    progress.skip(name)
    return
  progress.begin(name)
  work(lambda units, *_: progress.update(name, units))
  progress.end(name)


def _stage_outputs(workdir: pathlib.Path, recipe: Recipe) -> dict:
  """What each stage that is not training writes: with all of it on disk, the stage is done."""
  outputs = {"data": [workdir / "data" / "test.jsonl", workdir / "tokenizer.model"],
             "pairs": [workdir / "preferences.jsonl"], "eval_sft": [workdir / "sft" / "test_eval.json"],
             "table2": [workdir / "variance_table.json"]}
  for seed in recipe.seeds:
    for variant in ("vrpo", "naive_dpo"):
      outputs[f"eval_{variant}_seed{seed}"] = [workdir / f"{variant}_seed{seed}" / "test_eval.json"]
  return outputs


def _prepare_data(workdir: pathlib.Path, recipe: Recipe, report) -> None:
  data_dir = workdir / "data"
  if not (data_dir / "test.jsonl").exists():
    demo_task.write_task(data_dir, train=recipe.n_train, validation=recipe.n_validation, test=recipe.n_test,
                         level=recipe.level)
  if not (workdir / "tokenizer.model").exists():
    tok_lib.train_sentencepiece([data_dir / "pretrain.txt"], workdir / "tokenizer", vocab_size=recipe.vocab_size,
                                overwrite=True)  # no .model: a .vocab left beside it is stale
  report(1)


def _summary(recipe: Recipe, workdir: pathlib.Path, results: dict, table: list, timings: dict) -> dict:
  return {
      "test_accuracy": {k: {"mean": float(np.mean([r["accuracy"] for r in v])),
                            "std": float(np.std([r["accuracy"] for r in v])),
                            "per_seed": [r["accuracy"] for r in v]} for k, v in results.items()},
      # Each aligned model against the SFT model on the same test problems.
      "paired_vs_sft": {f"{k}_seed{seed}": paired_test(results["sft"][0]["correct"], r["correct"])
                        for k in ("vrpo", "naive_dpo") for seed, r in zip(recipe.seeds, results[k])},
      "preferences": json.loads((workdir / "preferences.stats.json").read_text()),
      "variance_table": [{k: v for k, v in r.items()} for r in table],
      "seconds": timings,
  }


def run_demo(workdir, recipe: Recipe = LEAN, emit=None) -> dict:
  """Runs (or resumes) the chain in `workdir`; `emit(line)` gets the progress lines (default: the log)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  _record_recipe(workdir, recipe)
  _record_dtype(workdir, recipe)
  progress = progress_lib.ChainProgress(plan(recipe), emit=emit or (lambda line: logging.info("demo %s", line)))
  outputs = _stage_outputs(workdir, recipe)
  finished = lambda name: all(p.exists() for p in outputs[name])  # noqa: E731
  for name in outputs:  # a resumed chain: what is on disk is left out of the time-left estimate
    if finished(name):
      progress.skip(name)
  timings = {}
  t0 = time.perf_counter()

  data_dir, tok_path = workdir / "data", workdir / "tokenizer.model"
  _tracked(progress, "data", finished("data"), lambda report: _prepare_data(workdir, recipe, report))
  tokenizer = tok_lib.load_tokenizer(tok_path)
  timings["data"] = time.perf_counter() - t0

  def stage(name, arg, run_name, files, steps, seed=0, init_from=None):
    t = time.perf_counter()
    config = _stage_config(recipe, name, arg, workdir / run_name, files, str(tok_path), steps, seed)
    if init_from is not None:
      config.checkpoint.init_from = str(workdir / init_from / "checkpoints")
    out = _train(config, on_progress=lambda done, total: progress.update(run_name, done))
    progress.end(run_name)
    timings[run_name] = time.perf_counter() - t
    return out

  def evaluate(run_name):
    t, name = time.perf_counter(), f"eval_{run_name}"
    if not finished(name):  # evaluate_run reads a finished evaluation back
      progress.begin(name)
    result = evaluate_run(workdir / run_name, tokenizer, test, recipe, workdir / run_name / "test_eval.json",
                          on_batch=lambda done, _: progress.update(name, done))
    progress.end(name)
    timings[name] = time.perf_counter() - t
    return result

  def make_pairs(report):
    prompts = demo_task.read_jsonl(data_dir / "train.jsonl")
    chosen = random.Random(1234).sample(prompts, min(recipe.pref_prompts, len(prompts)))
    stats = build_preference_pairs(workdir / "sft", tokenizer, chosen, recipe, jax.random.key(7), pairs_path,
                                   on_batch=report)
    files.write_json_atomic(workdir / "preferences.stats.json", stats)

  stage("pretrain", None, "pretrain", [data_dir / "pretrain.txt"], recipe.pretrain_steps)
  stage("sft", None, "sft", [data_dir / "train.jsonl"], recipe.sft_steps, init_from="pretrain")
  test = demo_task.read_jsonl(data_dir / "test.jsonl")
  pairs_path = workdir / "preferences.jsonl"
  t = time.perf_counter()
  _tracked(progress, "pairs", finished("pairs"), make_pairs)
  timings["preferences"] = time.perf_counter() - t

  results = {"sft": [evaluate("sft")]}
  for seed in recipe.seeds:
    for variant in ("vrpo", "naive_dpo"):
      run_name = f"{variant}_seed{seed}"
      stage("vrpo", variant, run_name, [pairs_path], recipe.vrpo_steps, seed=seed, init_from="sft")
      results.setdefault(variant, []).append(evaluate(run_name))
  t = time.perf_counter()
  table_path = workdir / "variance_table.json"
  _tracked(progress, "table2", finished("table2"), lambda report: files.write_json_atomic(table_path, variance_table(
      workdir, recipe, policy=f"vrpo_seed{recipe.seeds[0]}", **dict(recipe.table2), on_setting=report)))
  table = json.loads(table_path.read_text())
  plots.variance_table(table, workdir / "variance_table.png")
  runs = {name: workdir / name / "metrics.jsonl" for name in
          ["pretrain", "sft"] + [f"{v}_seed{recipe.seeds[0]}" for v in ("vrpo", "naive_dpo")]}
  plots.training_curves(runs, workdir / "training_curves.png")
  timings["variance_table"] = time.perf_counter() - t
  timings["total"] = time.perf_counter() - t0
  summary = _summary(recipe, workdir, results, table, timings)
  files.write_json_atomic(workdir / "results.json", summary)
  return summary


def bfloat16_matmul_speedup(n: int = 1024, repeats: int = 5) -> float:
  """float32 time over bfloat16 time of an n^3 matmul on the default device: above 1, bfloat16 is faster."""
  f32, _ = timing.time_matmul("float32", n, repeats=repeats)
  bf16, _ = timing.time_matmul("bfloat16", n, repeats=repeats)
  return float(np.median(f32) / np.median(bf16))


DTYPE_FILE = "demo_dtype.json"
# bfloat16 rounds every matmul input; it is chosen only where it is clearly faster. Measured 1024^3
# speedups: 1.6x on CPUs with native bfloat16 dot products, 0.43-0.65x on AVX2 / AVX-512 CPUs without.
BFLOAT16_MIN_SPEEDUP = 1.2


def read_dtype(workdir) -> str | None:
  """The compute dtype of the runs in `workdir`, or None for a new workdir."""
  workdir = pathlib.Path(workdir)
  dtype = _read_record(workdir / DTYPE_FILE, "dtype", ("float32", "bfloat16"), "'float32' or 'bfloat16'")
  if dtype is not None:
    return dtype
  if (workdir / "pretrain").exists():  # a workdir from before the choice was recorded: the recipe's dtype
    return _config_dtype()
  return None


def choose_dtype(requested: str, workdir, measure=None) -> tuple[str, str]:
  """The compute dtype for a demo in `workdir` and why: the workdir's own if it has runs, else
  `requested`, where "auto" measures the bfloat16 matmul speedup (`measure()`) on this device."""
  if requested not in ("auto", "float32", "bfloat16"):
    raise ValueError(f"--dtype={requested}: expected auto, float32 or bfloat16")
  stored = read_dtype(workdir)
  if stored is not None:
    if requested not in ("auto", stored):
      raise ValueError(f"--dtype={requested}: the runs in {workdir} compute in {stored}; expected --dtype={stored} "
                       "or auto to resume them, or a new --workdir")
    return stored, f"the dtype of the runs already in {workdir}"
  if requested != "auto":
    return requested, "--dtype"
  speedup = (measure or bfloat16_matmul_speedup)()
  dtype = "bfloat16" if speedup >= BFLOAT16_MIN_SPEEDUP else "float32"
  return dtype, f"bfloat16 matmuls run at {speedup:.2f}x the float32 speed here (bfloat16 from {BFLOAT16_MIN_SPEEDUP}x)"


def format_results(summary: dict) -> str:
  lines = ["| model | test accuracy (mean +- std over seeds) | per seed |", "| --- | --- | --- |"]
  for name, acc in summary["test_accuracy"].items():
    per_seed = ", ".join(f"{a:.3f}" for a in acc["per_seed"])
    lines.append(f"| {name} | {acc['mean']:.3f} +- {acc['std']:.3f} | {per_seed} |")
  lines += ["", "| vs SFT, same test problems | fixed | broken | p (exact McNemar) |", "| --- | --- | --- | --- |"]
  for name, t in summary["paired_vs_sft"].items():
    lines.append(f"| {name} | {t['fixed']} | {t['broken']} | {t['p_value']:.3g} |")
  return "\n".join(lines)
