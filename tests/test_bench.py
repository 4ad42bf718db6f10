"""Tests of the benchmark (`llada_jax.bench`: its sections and command line) on tiny models; the timings
themselves are not checked."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest

from llada_jax import sampling
from llada_jax.bench import __main__ as bench_cli
from llada_jax.bench import ceiling, core, elbo, lora, packing, sizes, train_step
from llada_jax.bench import data as data_section
from llada_jax.bench import sampling as sampling_section
from llada_jax.data import demo_task, tokenizer as tokenizer_lib
from tests import helpers

# Small enough that compilation dominates; two blocks, so cached variants have 2 full passes.
SIZES = ["--prompt_length", "8", "--gen_length", "8", "--block_length", "4", "--steps", "8"]
VARIANTS = ("exact", "prefix", "dual", "threshold", "dual+threshold")


@pytest.fixture(scope="module", autouse=True)
def cheap_compilation():
  """Cheap backend codegen for the samplers: compilation dominates at these sizes.

  Patched here rather than offered as a flag, so the CLI cannot time a deoptimised build.
  """
  if jax.default_backend() != "cpu":
    yield
    return
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sampling, "sample", functools.partial(
        sampling.sample, compiler_options={"xla_backend_optimization_level": 0}))
    yield


def flags(*extra):
  return ["--model", "tiny", *SIZES, "--batch_sizes", "1", "--repeats", "2", *extra]


@pytest.fixture(scope="module")
def sampling_results():
  return sampling_section.bench_sampling(core.Context(bench_cli.parse_args(flags())))


def test_sampling_rows_and_forward_counts(sampling_results):
  rows = {r.settings["variant"]: r for r in sampling_results}
  assert tuple(rows) == VARIANTS
  steps, num_blocks, gen_length = 8, 2, 8
  for name, r in rows.items():
    m = r.metrics
    assert len(r.times_s) == 2 and len(r.warmup_s) == 1  # compilation is not among the timed calls
    assert m["tokens_per_s"] > 0 and m["tokens_per_s"] == pytest.approx(1 * gen_length / r.median_s)
    if name in ("exact", "prefix", "dual"):
      assert m["nfe"] == steps
    else:  # threshold decoding commits at least one token per step
      assert 1 <= m["nfe"] <= gen_length
    if rows[name].settings["cache"] == "none":
      assert m["full_forwards"] == m["nfe"]
    else:  # one full pass at each block start, the other steps on the cache
      assert m["full_forwards"] == num_blocks
  assert rows["exact"].metrics["speedup_vs_exact"] == 1.0
  for r in rows.values():
    assert r.metrics["speedup_vs_exact"] == pytest.approx(rows["exact"].median_s / r.median_s)
    assert r.median_s == pytest.approx(float(np.median(r.times_s)))
    assert "accuracy" not in r.metrics  # a random model has none


def test_table_lists_every_variant(sampling_results):
  table = core.format_table("sampling", sampling_results)
  assert all(v in table for v in VARIANTS) and "tokens/s" in table
  assert "accuracy" not in table  # columns with no values are left out
  md = core.format_table("sampling", sampling_results, markdown=True).splitlines()
  assert md[2].startswith("| variant |") and md[3] == "|" + " --- |" * md[2].count(" | ") + " --- |"
  assert len(md) == 4 + len(sampling_results) and all(line.count("|") == md[2].count("|") for line in md[2:])


def test_cli_writes_json_with_command_and_rows(tmp_path, capsys):
  out = tmp_path / "res" / "bench.json"
  argv = ["--only", "sampling", *flags("--variants", "exact,dual", "--model.dtype=float32", "--output", str(out))]
  assert bench_cli.main(argv) == 0
  assert "dual" in capsys.readouterr().out
  report = json.loads(out.read_text())
  assert report["command"] == "python -m llada_jax.bench " + " ".join(argv)
  assert report["argv"] == argv
  assert report["model"]["source"] == "random:tiny" and report["model"]["config"]["d_model"] == 32
  assert report["settings"]["repeats"] == 2 and report["environment"]["backend"]
  assert [r["name"] for r in report["results"]] == ["exact@b1", "dual@b1"]
  for r in report["results"]:
    assert r["section"] == "sampling"
    assert set(r["timing"]) >= {"median_s", "min_s", "max_s", "iqr_s", "times_s", "warmup_s"}
    assert r["timing"]["min_s"] <= r["timing"]["median_s"] <= r["timing"]["max_s"]
    assert set(r["metrics"]) >= {"tokens_per_s", "s_per_call", "nfe", "full_forwards", "speedup_vs_exact"}


def test_model_flags():
  args = bench_cli.parse_args(["--model", "tiny", "--model.n_layers=1", "--model.dtype", "bfloat16",
                           "--model_overrides", "d_model=64,rope_theta=1e4"])
  cfg = core.model_config_from_preset(args.model, args.model_overrides)
  assert (cfg.n_layers, cfg.dtype, cfg.d_model, cfg.rope_theta) == (1, "bfloat16", 64, 1e4)
  reference = core.model_config_from_preset("reference", {})
  assert (reference.d_model, reference.n_layers, reference.n_heads, reference.mlp_hidden_size,
          reference.vocab_size) == (512, 8, 8, 1536, 8192)


def test_each_parse_starts_from_the_defaults():
  first = bench_cli.parse_args(["--model", "tiny", "--batch_sizes", "2,4", "--markdown", "--model.n_layers=1"])
  again = bench_cli.parse_args(["--model", "tiny"])
  assert (first.batch_sizes, first.markdown, first.model_overrides) == ([2, 4], True, {"n_layers": 1})
  assert (again.batch_sizes, again.markdown, again.model_overrides) == ([1, 8], False, {})


def test_help_shows_the_usage_and_every_flag(capsys):
  assert bench_cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith(bench_cli.__doc__.splitlines()[0]) and "python -m llada_jax.bench [--only" in out
  assert all(f"--{name}:" in out or f"--[no]{name}:" in out for name in vars(bench_cli.parse_args([])))


@pytest.mark.parametrize("argv, message", [
    (["--only", "nope"], "--only=nope"),
    (["--model", "tiny", "--variants", "exact,fast"], "--variants=exact,fast"),
    (["--model", "tiny", "--model.d_model=33"], "model.n_heads"),
    (["--model", "tiny", "--task_data", "x.jsonl"], "--task_data needs --checkpoint"),
    (["--model", "tiny", "--checkpoint", "run"], "expected one of them"),
])
def test_bad_flags_fail_with_a_message(argv, message, capsys):
  assert bench_cli.main(argv) == 1
  assert message in capsys.readouterr().err


def test_malformed_override_is_a_usage_error(capsys):
  assert bench_cli.main(["--model", "tiny", "--model_overrides", "d_model"]) == 2
  assert "'d_model' is not FIELD=VALUE" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  from tests import train_fixtures

  root = tmp_path_factory.mktemp("bench_run")
  run, corpus = train_fixtures.train_tiny_sft_run(root)
  paths = demo_task.write_task(root / "task", train=2, validation=1, test=2, level="easy")
  return run, paths["test"], corpus["tokenizer"]


def test_accuracy_columns_with_a_checkpoint(trained_run, tmp_path, capsys):
  run_dir, test_file, tokenizer_path = trained_run
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
  # The timed prompts are the task's, padded to the length the evaluation buckets them to, so
  # both share one compilation per variant.
  prompt_length = sampling.bucket_length(max(len(tokenizer.encode(ex["prompt"]))
                                             for ex in demo_task.read_jsonl(test_file)))
  out = tmp_path / "bench.json"
  assert bench_cli.main(["--only", "sampling", "--checkpoint", str(run_dir), "--task_data", test_file,
                     "--num_examples", "2", "--eval_batch_size", "2", "--batch_sizes", "2",
                     "--variants", "exact,dual+threshold", "--prompt_length", str(prompt_length),
                     "--gen_length", "8", "--block_length", "4",
                     "--steps", "8", "--repeats", "1", "--output", str(out)]) == 0
  assert "acc drop" in capsys.readouterr().out
  report = json.loads(out.read_text())
  assert report["model"]["source"].startswith("checkpoint:")
  rows = {r["settings"]["variant"]: r for r in report["results"]}
  assert set(rows) == {"exact", "dual+threshold"}
  for r in rows.values():
    m = r["metrics"]
    assert r["settings"]["prompt_source"] == "task"
    assert 0 <= m["accuracy"] <= 1 and m["eval_n"] == 2 and m["tokens_per_s"] > 0
    assert m["accuracy_drop_vs_exact"] == pytest.approx(rows["exact"]["metrics"]["accuracy"] - m["accuracy"])
  assert rows["exact"]["metrics"]["accuracy_drop_vs_exact"] == 0


@pytest.mark.slow  # over 40 s on 2 cores; the section is opt-in
def test_lm_eval_section_times_each_sampler_through_lm_eval(trained_run, tmp_path, capsys):
  pytest.importorskip("lm_eval")
  run_dir, test_file, _ = trained_run
  out = tmp_path / "bench.json"
  assert bench_cli.main(["--only", "lm_eval", "--checkpoint", str(run_dir), "--task_data", test_file,
                         "--lm_eval_limit", "2", "--eval_batch_size", "2", "--variants", "exact,dual+threshold",
                         "--gen_length", "8", "--block_length", "4", "--steps", "8", "--repeats", "1",
                         "--output", str(out)]) == 0
  assert "speed-up (generate)" in capsys.readouterr().out
  rows = {r["settings"]["variant"]: r for r in json.loads(out.read_text())["results"]}
  assert set(rows) == {"exact", "dual+threshold"}
  assert rows["dual+threshold"]["settings"]["cache"] == "dual" and rows["exact"]["settings"]["cache"] == "none"
  for r in rows.values():
    m = r["metrics"]
    assert m["documents"] == 2 and 0 <= m["accuracy"] <= 1
    assert 0 < m["generate_s"] <= r["timing"]["median_s"]
  assert rows["exact"]["metrics"]["points_vs_exact"] == 0 and rows["exact"]["metrics"]["speedup_generate"] == 1
  # Without a checkpoint the section is refused in one line, and it is not in the default run.
  assert bench_cli.main(["--only", "lm_eval", "--model", "tiny"]) == 1
  assert "needs --checkpoint" in capsys.readouterr().err


def test_task_data_without_answers_is_refused(trained_run, tmp_path, capsys):
  run_dir, _, _ = trained_run
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "Mia has 2 apples.\n"}) + "\n")
  assert bench_cli.main(["--only", "sampling", "--checkpoint", str(run_dir), "--task_data", str(bad)]) == 1
  assert f"{bad}, example 1: expected a demo-task object" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# ceiling, train_step and elbo at the tiny size.

STEP_FLAGS = ["--size", "tiny", "--dtype", "float32", "--matmul_size", "128", "--bandwidth_mb", "4",
              "--repeats", "2"]


@pytest.fixture(scope="module")
def cheap_steps():
  with helpers.cheap_train_steps():
    yield


@pytest.fixture(scope="module")
def step_run(cheap_steps):
  ctx = core.Context(bench_cli.parse_args([*STEP_FLAGS, "--objectives", "pretrain,vrpo", "--vrpo_n", "2"]))
  return ctx, train_step.bench_train_step(ctx)


def test_ceiling_rows(cheap_steps):
  ctx = core.Context(bench_cli.parse_args([*STEP_FLAGS, "--dtype", "float32,bfloat16"]))
  rows = {r.name: r for r in ceiling.bench_ceiling(ctx)}
  assert list(rows) == ["matmul_float32", "matmul_bfloat16", "bandwidth"]
  for dtype in ("float32", "bfloat16"):
    r = rows[f"matmul_{dtype}"]
    assert r.metrics["flops_per_s"] == pytest.approx(2 * 128 ** 3 / r.median_s) and r.metrics["flops_per_s"] > 0
    assert ctx.ceilings.flops_per_s(dtype) == r.metrics["flops_per_s"]  # what MFU is measured against
  bw = rows["bandwidth"]
  n = 4 * (1 << 20) // 4
  assert bw.settings["size"] == n and bw.metrics["bytes_moved"] == 2 * 4 * n
  assert bw.metrics["gb_per_s"] == pytest.approx(2 * 4 * n / bw.median_s / 1e9)
  assert "GB/s" in core.format_table("ceiling", list(rows.values()))


def test_train_step_rows_rates_and_flops(step_run):
  from llada_jax import metrics, model as model_lib  # noqa: PLC0415

  ctx, results = step_run
  rows = {r.name: r for r in results}
  assert list(rows) == ["tiny/float32/pretrain", "tiny/float32/vrpo/n2/online", "tiny/float32/vrpo/n2/precomputed"]
  cfg = model_lib.ModelConfig.from_dict(core.model_config_from_preset("tiny", {}).__dict__)
  b, l = 8, 16
  ceiling = ctx.ceilings.flops_per_s("float32")
  for r in results:
    m = r.metrics
    assert len(r.times_s) == 2 and len(r.warmup_s) == 1 and r.median_s > 0
    assert m["achieved_flops_per_s"] == pytest.approx(m["flops_per_step"] / r.median_s / jax.device_count())
    assert m["mfu"] == pytest.approx(m["achieved_flops_per_s"] / ceiling) and m["mfu"] > 0
    assert m["mfu_datasheet"] is None  # a CPU has no datasheet peak
    # Counting the embedding table too (the reference figures' convention) can only add FLOPs.
    assert m["mfu_6n"] > m["mfu"]
    assert np.isfinite(m["loss"]) and m["compile_s"] > 0
  pre = rows["tiny/float32/pretrain"]
  assert pre.metrics["flops_per_step"] == metrics.lm_step_flops(cfg, batch_size=b, seq_len=l)
  assert pre.metrics["mfu_6n"] == pytest.approx(
      metrics.lm_step_flops(cfg, batch_size=b, seq_len=l, count_embedding=True) / pre.median_s / jax.device_count()
      / ceiling)
  assert pre.metrics["tokens_per_s"] == pytest.approx(b * l / pre.median_s)
  online, precomputed = rows["tiny/float32/vrpo/n2/online"], rows["tiny/float32/vrpo/n2/precomputed"]
  for r, is_pre in ((online, False), (precomputed, True)):
    expected = metrics.vrpo_step_flops(cfg, n_pairs=b, seq_len=l, n_timesteps=2, masks_per_timestep=1,
                                       reference_precomputed=is_pre).total
    assert r.metrics["flops_per_step"] == expected
    assert r.metrics["tokens_per_s"] == pytest.approx(2 * b * l / r.median_s)  # chosen and rejected rows
    assert r.metrics["model_tokens_per_s"] == pytest.approx(2 * 2 * b * l / r.median_s)  # 2n noised copies
    assert r.settings["n"] == 2 and r.settings["grad_accum_steps"] == 1
  # Without the reference forward a step is 3 policy passes instead of 4.
  assert precomputed.metrics["flops_per_step"] * 4 == online.metrics["flops_per_step"] * 3
  assert precomputed.metrics["step_time_vs_online"] == pytest.approx(precomputed.median_s / online.median_s)
  assert online.metrics["step_time_vs_online"] == 1.0
  assert precomputed.metrics["reference_precompute_s"] > 0
  table = core.format_table("train_step", results)
  assert "MFU" in table and "precomputed" in table and "vs online" in table


def test_micro_batches_keep_within_the_token_budget():
  args = bench_cli.parse_args(["--max_micro_batch_tokens", "8192"])
  ref = sizes.SIZES["ref35m"]  # 8 pairs of 256 tokens
  assert train_step.grad_accum_steps(args, "pretrain", ref, 1, shards=1) == 1
  assert train_step.grad_accum_steps(args, "vrpo", ref, 1, shards=1) == 1  # 16 rows x 256 = 4096 tokens
  assert train_step.grad_accum_steps(args, "vrpo", ref, 8, shards=1) == 4  # 128 rows -> 4 x 32 rows
  assert train_step.grad_accum_steps(args, "vrpo", ref, 8, shards=4) == 2  # micro-batches split over 4 shards
  args.grad_accum_steps = 2
  assert train_step.grad_accum_steps(args, "vrpo", ref, 8, shards=1) == 2  # an explicit count wins


def test_elbo_rows():
  ctx = core.Context(bench_cli.parse_args([*STEP_FLAGS, "--mc_num", "8,16", "--elbo_batch_size", "8",
                                        "--elbo_sequences", "3"]))
  results = elbo.bench_elbo(ctx)
  assert [r.name for r in results] == ["tiny/float32/mc8", "tiny/float32/mc16"]
  for r, mc_num in zip(results, (8, 16)):
    m = r.metrics
    assert r.settings["sequences"] == 3 and r.settings["padded_length"] == 16
    assert m["sequences_per_s"] == pytest.approx(3 / r.median_s)
    assert m["forward_tokens_per_s"] == pytest.approx(3 * mc_num * 16 / r.median_s)
    assert m["mfu"] == pytest.approx(m["achieved_flops_per_s"] / ctx.ceilings.flops_per_s("float32"))
    assert np.isfinite(m["mean_elbo"]) and m["mean_elbo"] < 0  # a log-likelihood bound


def test_cli_report_holds_the_ceilings(tmp_path, cheap_steps):
  out = tmp_path / "bench.json"
  argv = ["--only", "ceiling,train_step", *STEP_FLAGS, "--objectives", "sft", "--output", str(out)]
  assert bench_cli.main(argv) == 0
  report = json.loads(out.read_text())
  assert [r["section"] for r in report["results"]] == ["ceiling", "ceiling", "train_step"]
  assert set(report["ceilings"]) == {"float32"}
  step = report["results"][-1]
  assert step["metrics"]["ceiling_gflops_per_s"] == pytest.approx(report["ceilings"]["float32"] / 1e9)
  assert step["settings"]["objective"] == "sft" and step["settings"]["attention_impl"] == "auto"


@pytest.mark.parametrize("argv, message", [
    (["--size", "huge"], "--size=huge"),
    (["--dtype", "float64"], "--dtype=float64"),
    (["--batch_sizes", "1,a"], "--batch_sizes=1,a: expected comma-separated integers"),
    (["--nope", "1"], "Unknown command line flag 'nope'"),
    (["ceiling"], "unexpected arguments: ceiling"),
    (["--packing_remat", "some"], "--packing_remat=some"),
    (["--lora_variants", "qlora"], "--lora_variants=qlora"),
])
def test_bad_sizes_are_usage_errors(argv, message, capsys):
  assert bench_cli.main(argv) == 2
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--only", "train_step", "--size", "tiny", "--objectives", "dpo"], "--objectives=dpo"),
    (["--only", "train_step", "--size", "tiny", "--reference", "cached"], "--reference=cached"),
    (["--only", "train_step", "--size", "tiny", "--vrpo_n", "0"], "--vrpo_n=[0]"),
    (["--only", "elbo", "--size", "tiny", "--mc_num", "12", "--elbo_batch_size", "8"], "mc_num=12"),
    (["--only", "packing", "--size", "tiny", "--packing_vrpo_n", "4", "--packing_chunks", "1,3"],
     "--packing_chunks=1,3: expected divisors of --packing_vrpo_n=4"),
    (["--only", "packing", "--size", "tiny", "--packing_batches", "0"], "--packing_batches=0"),
    (["--only", "lora", "--size", "tiny", "--lora_rank", "0"], "--lora_rank=0"),
    (["--only", "lora", "--size", "tiny", "--lora_vrpo_n", "-1"], "--lora_vrpo_n=-1"),
    (["--only", "data", "--data_records", "4", "--data_batch_size", "8"], "--data_records=4, --data_batch_size=8"),
])
def test_bad_section_flags_fail_with_a_message(argv, message, capsys):
  assert bench_cli.main(argv) == 1
  assert message in capsys.readouterr().err


def test_rates_against_a_known_device_peak(monkeypatch):
  from llada_jax import metrics  # noqa: PLC0415

  monkeypatch.setattr(metrics, "peak_flops_per_device", lambda dtype: 1e12 if dtype == "bfloat16" else None)
  r = ceiling.rates(6e11, 2.0, 5e11, "bfloat16")  # 3e11 FLOP/s per device on one device
  assert r["achieved_flops_per_s"] == pytest.approx(3e11 / jax.device_count())
  assert r["mfu"] == pytest.approx(r["achieved_flops_per_s"] / 5e11)
  assert r["mfu_datasheet"] == pytest.approx(r["achieved_flops_per_s"] / 1e12)
  assert ceiling.rates(6e11, 2.0, 5e11, "float32")["mfu_datasheet"] is None


@pytest.mark.slow  # over 40 s on 2 cores; compiles the padded and packed steps
def test_packing_rows(cheap_steps):
  argv = ["--only", "packing", "--size", "tiny", "--dtype", "float32", "--repeats", "1", "--warmup", "0",
          "--packing_vrpo_n", "2", "--packing_chunks", "1,2", "--packing_remat", "none"]
  results = packing.bench_packing(core.Context(bench_cli.parse_args(argv)))
  rows = {r.name: r for r in results}
  assert list(rows) == ["tiny/float32/sft/padded", "tiny/float32/sft/packed", "tiny/float32/vrpo/padded/n2/c1/none",
                        "tiny/float32/vrpo/packed/n2/c1/none", "tiny/float32/vrpo/packed/n2/c2/none"]
  b, l = 8, 16
  for objective, suffix in (("sft", ""), ("vrpo", "/n2/c1/none")):
    padded, packed = rows[f"tiny/float32/{objective}/padded{suffix}"], rows[f"tiny/float32/{objective}/packed{suffix}"]
    for r in (padded, packed):
      m = r.metrics
      assert len(r.times_s) == 1 and not r.warmup_s and np.isfinite(m["loss"])
      assert 0 <= m["padding_fraction"] <= 1
      positions = b * l * (2 if objective == "vrpo" else 1)  # VRPO: chosen and rejected rows
      assert m["useful_tokens_per_step"] == pytest.approx((1 - m["padding_fraction"]) * positions)
      assert m["useful_tokens_per_s"] == pytest.approx(m["useful_tokens_per_step"] / r.median_s)
    assert padded.metrics["examples_per_step"] == b < packed.metrics["examples_per_step"]
    assert packed.metrics["padding_fraction"] < padded.metrics["padding_fraction"]
    assert packed.metrics["useful_tokens_per_step"] > padded.metrics["useful_tokens_per_step"]
    ratio = packed.metrics["useful_tokens_per_s"] / padded.metrics["useful_tokens_per_s"]
    assert packed.metrics["useful_vs_padded"] == pytest.approx(ratio) and padded.metrics["useful_vs_padded"] == 1
  chunked = rows["tiny/float32/vrpo/packed/n2/c2/none"]
  assert chunked.settings["copy_chunks"] == 2 and chunked.metrics["peak_gb"] > 0
  assert "useful_vs_padded" not in chunked.metrics
  unchunked = rows["tiny/float32/vrpo/packed/n2/c1/none"]
  assert chunked.metrics["time_vs_unchunked"] == pytest.approx(chunked.median_s / unchunked.median_s)
  assert unchunked.metrics["time_vs_unchunked"] == 1
  assert "useful tok/s" in core.format_table("packing", results)


@pytest.mark.slow  # over 40 s on 2 cores; compiles six steps
def test_lora_rows(cheap_steps):
  # SFT only: the VRPO step with adapters is the training tests' (test_lora.py); here, the section's rows.
  argv = ["--only", "lora", "--size", "tiny", "--dtype", "float32", "--repeats", "1", "--warmup", "0",
          "--lora_objectives", "sft", "--lora_rank", "2"]
  results = lora.bench_lora(core.Context(bench_cli.parse_args(argv)))
  rows = {r.name: r for r in results}
  assert list(rows) == [f"tiny/float32/sft/{v}" for v in ("full", "lora", "lora_bf16")]
  cfg = sizes.size_model_config(core.Context(bench_cli.parse_args(argv)), "tiny", "float32")
  for objective in ("sft",):
    full, adapters, bf16 = (rows[f"tiny/float32/{objective}/{v}"] for v in ("full", "lora", "lora_bf16"))
    assert full.settings["trainable_params"] == cfg.num_params() and full.settings["rank"] is None
    # Rank-2 adapters on every projection: r (fan_in + fan_out) per kernel.
    d, q, kv, m = cfg.d_model, cfg.n_heads * cfg.resolved_head_dim, cfg.kv_heads * cfg.resolved_head_dim, \
        cfg.mlp_hidden_size
    adapter_count = cfg.n_layers * 2 * ((d + q) * 2 + (d + kv) * 2 + (d + m) * 3)
    assert adapters.settings["trainable_params"] == bf16.settings["trainable_params"] == adapter_count
    assert adapters.settings["frozen_params"] == bf16.settings["frozen_params"] == cfg.num_params()
    assert (adapters.settings["base_dtype"], bf16.settings["base_dtype"]) == ("float32", "bfloat16")
    # The frozen base carries no gradient or optimizer state.
    assert adapters.metrics["peak_gb"] < full.metrics["peak_gb"]
    for r in (full, adapters, bf16):
      assert len(r.times_s) == 1 and np.isfinite(r.metrics["loss"])
      assert r.metrics["time_vs_full"] == pytest.approx(r.median_s / full.median_s)
      assert r.metrics["memory_vs_full"] == pytest.approx(r.metrics["peak_gb"] / full.metrics["peak_gb"])
  assert "memory vs full" in core.format_table("lora", results)


def test_packing_length_mix():
  import math  # noqa: PLC0415

  prompts, answers = packing.sample_lengths(np.random.default_rng(0), 256, 20000, answers=2)
  assert prompts.min() == 8 and prompts.max() == 32  # uniform in [L / 32, L / 8]
  assert answers.min() >= 1 and (prompts + answers + 1 <= 256).all()  # clipped to fit with the EOS
  assert np.median(answers) == pytest.approx(64, rel=0.05)  # log-normal, median L / 4
  assert np.std(np.log(answers[answers < 200])) == pytest.approx(0.8, rel=0.15)
  assert math.isclose(np.corrcoef(answers)[0, 1], 0, abs_tol=0.05)  # chosen and rejected independent


def test_data_rows():
  pytest.importorskip("pyarrow")
  argv = ["--only", "data", "--data_records", "40", "--data_batch_size", "8", "--data_seq_len", "64",
          "--data_row_group", "16", "--repeats", "1", "--warmup", "0"]
  results = data_section.bench_data(core.Context(bench_cli.parse_args(argv)))
  rows = {r.name: r for r in results}
  assert list(rows) == ["sft/jsonl", "sft/parquet", "preference/jsonl", "preference/parquet"]
  for r in results:
    m = r.metrics
    assert len(r.times_s) == 1 and not r.warmup_s and m["batches"] == 40 // 8
    assert m["records_per_s"] == pytest.approx(40 / r.median_s) and 0 < m["build_s"] < r.median_s
    assert m["read_s"] > 0 and r.settings["file_mb"] > 0
  for kind in ("sft", "preference"):
    jsonl, parquet = rows[f"{kind}/jsonl"], rows[f"{kind}/parquet"]
    assert parquet.metrics["vs_jsonl"] == pytest.approx(jsonl.median_s / parquet.median_s)
    assert jsonl.metrics["vs_jsonl"] == 1.0
  assert "vs JSONL" in core.format_table("data", results)
