"""The `packing` section: SFT and VRPO training steps on a long-tailed length mix, one example per
row (padded) against the same example stream packed first fit into rows (`data.packing`), and the
packed VRPO step at each `vrpo.copy_chunks` x `model.remat`.

The length mix, at row length L (the size's seq_len), from one seeded generator, example by example:

  prompt   uniform integer in [max(1, L // 32), max(1, L // 8)]
  answer   round(lognormal(median L / 4, sigma 0.8)), at least 1, clipped to L - prompt - 1
  example  prompt + answer + one EOS (at most L), token ids random (none of the special ids)

VRPO pairs share one prompt, their chosen and rejected answers drawn independently from the same law.

Both layouts have B rows of L tokens per step (B: the size's batch_size). Padded: B examples per
step, one per row, EOS padding after it. Packed: the same stream through the training pipeline's
packer (`llada_jax.data.packing.pack`: Grain's first fit over `default_bins(B)` rows, bins shuffled)
into B rows per step. The step's shapes are static, so its time does not depend on the batch's
content: one batch is timed (the one whose useful tokens are nearest the mean), while useful tokens,
padding fraction (`batch_stats`) and examples per step are averaged over `--packing_batches` batches.
An objective's steps are all compiled first, then timed in turn, one call of each per round: their
ratios then hold when the machine's load changes during the run.
Useful tokens are the non-padding ones (VRPO: of the chosen and rejected rows; the 2n noised copies
multiply both layouts alike).
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Iterator

import grain
import jax
import numpy as np
from absl import flags

from llada_jax import model as model_lib
from llada_jax.bench import core, sizes, timing, train_step
from llada_jax.data import packing as packing_lib
from llada_jax.data import pipelines

OBJECTIVES = ("sft", "vrpo")
KINDS = {"sft": "sft", "vrpo": "preference"}
LAYOUTS = ("padded", "packed")
REMATS = tuple(model_lib._REMAT_POLICIES)  # pylint: disable=protected-access

# The length mix (module docstring); changing it changes every figure in docs/benchmarks.md.
PROMPT_RANGE = (1 / 32, 1 / 8)  # of L, uniform
ANSWER_MEDIAN = 1 / 4  # of L
ANSWER_SIGMA = 0.8  # of the answer length's log

core.define_list("packing_objectives", OBJECTIVES, "comma-separated among sft,vrpo", choices=OBJECTIVES)
flags.DEFINE_integer("packing_vrpo_n", 8, "VRPO budget n = n_t (n_yt = 1) of the packing section",
                     flag_values=core.FLAGS)
flags.DEFINE_integer("packing_max_segments", 16, "examples a packed row can hold (data.max_segments)",
                     flag_values=core.FLAGS)
flags.DEFINE_integer("packing_batches", 8, "batches of the stream the padding and examples per step are averaged over",
                     flag_values=core.FLAGS)
core.define_list("packing_chunks", [1, 2, 4], "vrpo.copy_chunks of the packed VRPO memory rows, each dividing "
                 "--packing_vrpo_n (empty: no memory rows)", item=int)
core.define_list("packing_remat", ["none", "full"], f"model.remat of the packed VRPO memory rows, among "
                 f"{','.join(REMATS)}", choices=REMATS)


# --------------------------------------------------------------------------------------------
# The example stream.


def sample_lengths(rng: np.random.Generator, seq_len: int, count: int, answers: int = 1
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(prompt lengths [count], answer lengths [answers, count]) of the length mix at row length seq_len."""
  lo = max(1, int(seq_len * PROMPT_RANGE[0]))
  hi = max(lo, int(seq_len * PROMPT_RANGE[1]))
  prompts = rng.integers(lo, hi + 1, count)
  raw = np.rint(rng.lognormal(math.log(seq_len * ANSWER_MEDIAN), ANSWER_SIGMA, (answers, count)))
  return prompts.astype(np.int32), np.clip(raw, 1, seq_len - 1 - prompts).astype(np.int32)


def example_stream(kind: str, cfg: model_lib.ModelConfig, seq_len: int, count: int, seed: int
                   ) -> list[dict[str, Any]]:
  """`count` unpadded examples of `kind` ('sft' or 'preference'), as the packer reads them."""
  rng = np.random.default_rng(seed)
  prompts, answers = sample_lengths(rng, seq_len, count, answers=2 if kind == "preference" else 1)
  eos = np.array([cfg.eos_token_id], np.int32)
  out = []
  for i in range(count):
    prompt = core.random_tokens(rng, cfg, (prompts[i],))
    seqs = [np.concatenate([prompt, core.random_tokens(rng, cfg, (a,)), eos]) for a in answers[:, i]]
    names = ("chosen", "rejected") if kind == "preference" else ("tokens",)
    out.append({**dict(zip(names, seqs)), "prompt_lengths": np.int32(prompts[i]), "example_id": np.int32(i)})
  return out


def stream_length(batch_size: int, batches: int, max_segments: int) -> int:
  """Examples enough for `batches` packed batches: the packer emits whole windows of bins, each row
  holding at most max_segments examples."""
  bins = packing_lib.default_bins(batch_size)
  return math.ceil(batches * batch_size / bins) * bins * max_segments + 1


def padded_batches(kind: str, examples: list[dict[str, Any]], batch_size: int, seq_len: int, pad_id: int
                   ) -> Iterator[dict[str, np.ndarray]]:
  """Batches of the unpacked format: one example per row, EOS after it."""
  names = packing_lib.SEQUENCE_FEATURES[kind]
  for start in range(0, len(examples) - batch_size + 1, batch_size):
    chunk = examples[start:start + batch_size]
    batch = {}
    for name in names:
      batch[name] = np.full((batch_size, seq_len), pad_id, np.int32)
      for row, ex in enumerate(chunk):
        batch[name][row, :len(ex[name])] = ex[name]
      if kind == "preference":
        batch[f"{name}_lengths"] = np.array([len(ex[name]) for ex in chunk], np.int32)
    for name in ("prompt_lengths", "example_id"):
      batch[name] = np.array([ex[name] for ex in chunk], np.int32)
    yield batch


def packed_batches(kind: str, examples: list[dict[str, Any]], batch_size: int, seq_len: int, pad_id: int,
                   max_segments: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
  """Batches of packed rows, packed as the training pipeline packs them."""
  stream = grain.MapDataset.source(examples).to_iter_dataset()
  rows = packing_lib.pack(stream, kind, seq_len=seq_len, pad_id=pad_id, max_segments=max_segments,
                          num_bins=packing_lib.default_bins(batch_size), seed=seed, shuffle_bins=True)
  return iter(rows.batch(batch_size, drop_remainder=True))


@dataclasses.dataclass
class Layout:
  """One layout's timed batch and its stream statistics, averaged over the batches taken."""

  batch: dict[str, np.ndarray]
  padding_fraction: float
  examples_per_step: float
  useful_tokens_per_step: float


def take_layout(kind: str, batches: Iterator[dict[str, np.ndarray]], count: int, *, packed: bool, pad_id: int,
                spec: dict[str, tuple]) -> Layout:
  """The first `count` batches: their mean statistics, and the batch nearest the mean useful tokens."""
  taken = [next(batches) for _ in range(count)]
  for batch in taken:
    shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
    if shapes != spec:  # what the training step is fed
      raise AssertionError(f"batch {shapes} does not match batch_spec {spec}")
  rows = len(taken[0][packing_lib.SEQUENCE_FEATURES[kind][0]])
  positions = taken[0][packing_lib.SEQUENCE_FEATURES[kind][0]].size * len(packing_lib.SEQUENCE_FEATURES[kind])
  stats = [packing_lib.batch_stats(b, kind, packed, eos_id=pad_id) for b in taken]
  useful = np.array([(1 - s["padding_fraction"]) * positions for s in stats])
  nearest = int(np.argmin(np.abs(useful - useful.mean())))
  return Layout(taken[nearest], float(np.mean([s["padding_fraction"] for s in stats])),
                float(np.mean([s["examples_per_row"] for s in stats])) * rows, float(useful.mean()))


def make_layouts(objective: str, cfg: model_lib.ModelConfig, size: sizes.Size, args) -> dict[str, Layout]:
  kind, b, l, k = KINDS[objective], size.batch_size, size.seq_len, args.packing_max_segments
  examples = example_stream(kind, cfg, l, stream_length(b, args.packing_batches, k), args.seed)
  pad = cfg.eos_token_id

  def spec(packed):
    return {name: (shape, np.dtype(np.int32)) for name, (shape, _) in
            pipelines.batch_spec(kind, b, l, packed=packed, max_segments=k).items()}

  return {"padded": take_layout(kind, padded_batches(kind, examples, b, l, pad), args.packing_batches,
                                packed=False, pad_id=pad, spec=spec(False)),
          "packed": take_layout(kind, packed_batches(kind, examples, b, l, pad, k, args.seed), args.packing_batches,
                                packed=True, pad_id=pad, spec=spec(True))}


# --------------------------------------------------------------------------------------------
# Timing.


def _check_packing(args: types.SimpleNamespace) -> None:
  if not args.packing_objectives or any(o not in OBJECTIVES for o in args.packing_objectives):
    raise ValueError(f"--packing_objectives={','.join(args.packing_objectives)}: expected a subset of sft,vrpo")
  n = args.packing_vrpo_n
  if n < 1 or args.packing_max_segments < 1 or args.packing_batches < 1:
    raise ValueError(f"--packing_vrpo_n={n}, --packing_max_segments={args.packing_max_segments}, --packing_batches="
                     f"{args.packing_batches}: expected positive integers")
  if any(c < 1 or n % c for c in args.packing_chunks):
    raise ValueError(f"--packing_chunks={','.join(map(str, args.packing_chunks))}: expected divisors of "
                     f"--packing_vrpo_n={n}")
  train_step.check_micro_batching(args)
  sizes.check_sizes(args)
  for size_name in args.size:
    if sizes.SIZES[size_name].seq_len < 3:  # a prompt, an answer and the EOS
      raise ValueError(f"--size={size_name}: rows of {sizes.SIZES[size_name].seq_len} tokens hold no example")
    for objective in args.packing_objectives:
      train_step.micro_batches(args, objective, size_name, n)


def _variants(args) -> list[tuple[str, str, int, str]]:
  """(objective, layout, copy_chunks, remat) of every timed step, in table order; remat '' is the size's."""
  out = [(objective, layout, 1, "") for objective in args.packing_objectives for layout in LAYOUTS]
  if "vrpo" in args.packing_objectives:
    out += [("vrpo", "packed", c, remat) for c in args.packing_chunks for remat in args.packing_remat]
  return out


class Weights:
  """Random weights per model config, made once and copied into each step's (donated) state; the VRPO
  reference is near the policy, as in train_step."""

  def __init__(self, seed: int):
    self.seed, self.params, self.references = seed, {}, {}

  def state_and_reference(self, program):
    cfg = program.model_cfg
    if cfg not in self.params:
      self.params[cfg] = core.init_params(cfg, self.seed)
      self.references[cfg] = jax.tree_util.tree_map(lambda x: x * 0.99, self.params[cfg])
    params = jax.device_put(self.params[cfg], program.state_shardings.params, may_alias=False)
    state = program.create_state(jax.random.key(self.seed), params=params)
    if not program.objective.needs_reference:
      return state, None
    return state, jax.device_put(self.references[cfg], program.reference_shardings)


@dataclasses.dataclass
class Step:
  """One compiled step and what its result reports."""

  name: str
  settings: dict[str, Any]
  data: Layout
  call: Any  # () -> metrics of one step, the state carried from call to call
  compile_s: float
  memory: int | None


def _prepare(ctx: core.Context, size_name: str, cfg: model_lib.ModelConfig, objective: str, layout: str,
             chunks: int, data: Layout, weights: Weights) -> Step:
  """One step built as training builds it (`build`), its state placed and the step compiled apart."""
  from llada_jax import sharding  # noqa: PLC0415
  from llada_jax.training import build as build_lib  # noqa: PLC0415

  args, size = ctx.args, sizes.SIZES[size_name]
  n = args.packing_vrpo_n if objective == "vrpo" else 1
  accum = train_step.micro_batches(args, objective, size_name, n)
  config = train_step.train_config(objective, cfg, size, args, n, False, accum)
  config.data.packing, config.data.max_segments = layout == "packed", args.packing_max_segments
  config.vrpo.copy_chunks = chunks
  program = build_lib.build(config)
  state, reference_params = weights.state_and_reference(program)
  root_key = jax.random.key(args.seed)
  batch = sharding.global_batch(data.batch, program.batch_sharding)
  compiled, compile_s, memory = train_step.compile_step(program.step, state, batch, root_key, reference_params)
  holder = [state]

  def call():
    holder[0], step_metrics = compiled(holder[0], batch, root_key, reference_params)  # the state is donated
    return step_metrics

  settings = {"size": size_name, "dtype": cfg.dtype, "objective": objective, "layout": layout,
              "n": n if objective == "vrpo" else None, "copy_chunks": chunks if objective == "vrpo" else None,
              "remat": cfg.remat, "seq_len": size.seq_len, "batch_size": size.batch_size,
              "max_segments": args.packing_max_segments if layout == "packed" else None,
              "grad_accum_steps": accum, "num_params": cfg.num_params()}
  name = f"{size_name}/{cfg.dtype}/{objective}/{layout}" + (f"/n{n}/c{chunks}/{cfg.remat}" if objective == "vrpo"
                                                             else "")
  return Step(name, settings, data, call, compile_s, memory)


def _time_group(steps: list[Step], args) -> list[core.Result]:
  """The steps timed in turn (`timing.time_interleaved`): their ratios hold under a changing load."""
  results = []
  for step, (times, warm, step_metrics) in zip(steps, timing.time_interleaved(
      [s.call for s in steps], repeats=args.repeats, warmup=args.warmup)):
    result = core.Result("packing", step.name, step.settings, times, warm)
    data = step.data
    result.metrics = {
        "useful_tokens_per_step": data.useful_tokens_per_step,
        "useful_tokens_per_s": data.useful_tokens_per_step / result.median_s,
        "padding_fraction": data.padding_fraction,
        "examples_per_step": data.examples_per_step,
        "compile_s": step.compile_s,
        "peak_gb": None if step.memory is None else step.memory / 1e9,
        "loss": float(step_metrics["loss"]),
    }
    results.append(result)
  return results


def _bench_objective(ctx: core.Context, size_name: str, cfg: model_lib.ModelConfig, objective: str,
                     layouts: dict[str, Layout], weights: Weights) -> list[core.Result]:
  """The objective's padded and packed steps (VRPO: and the memory rows), compiled, then timed in turn."""
  steps, keys = [], []
  for obj, layout, chunks, remat in _variants(ctx.args):
    step_cfg = dataclasses.replace(cfg, remat=remat or cfg.remat)
    key = (layout, chunks, step_cfg.remat)
    if obj != objective or key in keys:  # the memory rows include the packed step of the layout rows
      continue
    steps.append(_prepare(ctx, size_name, step_cfg, objective, layout, chunks, layouts[layout], weights))
    keys.append(key)
    print(f"packing {steps[-1].name}: compiled in {steps[-1].compile_s:.1f} s", flush=True)
  results = _time_group(steps, ctx.args)
  by_key = dict(zip(keys, results))
  padded, packed = by_key[("padded", 1, cfg.remat)], by_key[("packed", 1, cfg.remat)]
  padded.metrics["useful_vs_padded"] = 1.0
  packed.metrics["useful_vs_padded"] = packed.metrics["useful_tokens_per_s"] / padded.metrics["useful_tokens_per_s"]
  for (layout, _, _), result in by_key.items():
    if objective == "vrpo" and layout == "packed":  # the memory rows' cost against the unchunked step
      result.metrics["time_vs_unchunked"] = result.median_s / packed.median_s
  for result in results:
    print(f"packing {result.name}: {result.median_s:.3f} s/step, "
          f"{result.metrics['useful_tokens_per_s']:.1f} useful tokens/s", flush=True)
  return results


@core.register("packing", check=_check_packing, columns=(
    core.Column("size", "size"),
    core.Column("dtype", "dtype"),
    core.Column("objective", "objective"),
    core.Column("layout", "layout"),
    core.Column("n", "n"),
    core.Column("chunks", "copy_chunks"),
    core.Column("remat", "remat"),
    core.Column("accum", "grad_accum_steps"),
    core.Column("s/step", "median_s", "{:.3f}"),
    core.Column("iqr s", "iqr_s", "{:.3f}"),
    core.Column("useful tok/step", "useful_tokens_per_step", "{:.1f}"),
    core.Column("useful tok/s", "useful_tokens_per_s", "{:.1f}"),
    core.Column("padding", "padding_fraction", "{:.1%}"),
    core.Column("examples/step", "examples_per_step", "{:.2f}"),
    core.Column("vs padded", "useful_vs_padded", "{:.2f}x"),
    core.Column("time vs c1", "time_vs_unchunked", "{:.2f}x"),
    core.Column("peak GB", "peak_gb", "{:.2f}"),
    core.Column("compile s", "compile_s", "{:.1f}"),
))
def bench_packing(ctx: core.Context) -> list[core.Result]:
  """Padded against packed SFT and VRPO steps on the length mix, and the packed VRPO step at each
  copy_chunks x remat, per size and compute dtype."""
  args = ctx.args
  _check_packing(args)
  results = []
  for size_name in args.size:
    size = sizes.SIZES[size_name]
    for dtype in args.dtype:
      cfg = sizes.size_model_config(ctx, size_name, dtype)
      layouts = {objective: make_layouts(objective, cfg, size, args) for objective in args.packing_objectives}
      weights = Weights(args.seed)
      for objective in args.packing_objectives:
        results += _bench_objective(ctx, size_name, cfg, objective, layouts[objective], weights)
  return results
