"""The lm-evaluation-harness model `llada_jax`: lm-eval's own evaluation of the local tasks in
tests/data/lm_eval_tasks reproduces the project's likelihood scores and generations item by item;
chat markup, long-text windows, stop strings and model-argument errors."""

import contextlib
import dataclasses
import os
import pathlib
import subprocess
import sys
import types

# The task files are local; nothing may be fetched. Set before `datasets` is first imported.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from llada_jax.harness import options as options_lib, text as text_lib  # noqa: E402
from llada_jax.harness.options import ModelArgsError  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
TASKS = REPO / "tests" / "data" / "lm_eval_tasks"
# Small budgets: two stratified rounds of four rows; 8 tokens in blocks of 4, one per step.
MODEL_ARGS = dict(mc_num=8, batch_size=4, gen_length=8, block_length=4, steps=4, seed=3)


@pytest.fixture(scope="module")
def lm_eval():
  """lm-eval, or a skip: requested first, so nothing is built for tests that cannot run."""
  return pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  from tests import train_fixtures

  return train_fixtures.write_corpus(tmp_path_factory.mktemp("lm_eval_corpus"))


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory):
  """A run directory with random weights (x3, so scores and generations vary) and the corpus's
  sentencepiece tokenizer, saved as training saves it: an SFT run trained with the chat template."""
  from llada_jax import model as M
  from llada_jax.storage import checkpoint
  from tests import train_fixtures

  root = tmp_path_factory.mktemp("lm_eval_run")
  config = train_fixtures.make_config(corpus, root / "run", "sft").to_dict()
  cfg = M.ModelConfig.from_dict(config["model"])
  params = jax.tree_util.tree_map(lambda x: x * 3.0, M.init_params(cfg, jax.random.key(0)))
  with checkpoint.CheckpointManager(root / "run" / "checkpoints", async_save=False,
                                    metadata={"config": config}) as manager:
    manager.save(1, {"params": params}, force=True)
  return root / "run"


def _simple_evaluate(lm_eval, lm, tmp_path_factory):
  """lm-eval's simple_evaluate of the three local tasks with the chat template: (results, model)."""
  import datasets
  from lm_eval.tasks import TaskManager

  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(REPO)  # data_files in the task files are relative to the repository root
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=["llada_mc", "llada_gen", "llada_ppl"],
                                      task_manager=manager, apply_chat_template=True, log_samples=True)
  return results, lm


@pytest.fixture(scope="module")
def evaluated(lm_eval, run_dir, tmp_path_factory):
  """The three local tasks on one device: (results, model)."""
  from llada_jax.harness import model

  return _simple_evaluate(lm_eval, model.LLaDAJaxLM(checkpoint=str(run_dir), **MODEL_ARGS), tmp_path_factory)


@contextlib.contextmanager
def changed_options(lm, **changes):
  """The model with some model arguments changed inside the block (the loaded run is shared)."""
  original = lm.options
  lm.options = dataclasses.replace(original, **changes)
  try:
    yield lm
  finally:
    lm.options = original


def _responses(results, task):
  samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
  return [s["resps"] for s in samples]


def _scores(results, task) -> list[float]:
  """Every score of a likelihood task: (score, is_greedy) responses or bare scores."""
  return [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for doc in _responses(results, task) for r in doc]


def test_multiple_choice_scores_are_evaluates(evaluated):
  from llada_jax.eval import tasks

  results, lm = evaluated
  examples = tasks.load_task("mc", TASKS / "mc.jsonl")
  ours = tasks.run_multiple_choice(lm.params, lm.model_cfg, lm.tokenizer, examples, jax.random.key(3),
                                   chat_template=True, mc_num=8, batch_size=4)
  harness = _responses(results, "llada_mc")
  for record, resps in zip(ours["records"], harness, strict=True):
    assert [r[0][0] for r in resps] == record["elbo"]  # exactly: the same keys and forward passes
    assert [r[0][1] for r in resps] == [False] * len(resps)  # no greedy check asked for
  assert results["results"]["llada_mc"]["acc,none"] == ours["metrics"]["accuracy"]


def test_generations_are_evaluates_cut_at_the_stop_strings(evaluated):
  from llada_jax import evaluate
  from llada_jax.eval import tasks

  results, lm = evaluated
  examples = tasks.load_task("gsm8k", TASKS / "gen.jsonl")
  args = types.SimpleNamespace(gen_length=8, block_length=4, steps=4, temperature=0.0, remasking="low_confidence",
                               cfg_scale=0.0, suppress_eos=False, eos_confidence_penalty=0.0, cache="none",
                               refresh_every=0, threshold=None)
  config = evaluate.sampler_config_from_args(args, lm.tokenizer.eot_id)
  ours = tasks.run_generation(lm.params, lm.model_cfg, lm.tokenizer, examples, config, jax.random.key(3),
                              task="gsm8k", batch_size=4, chat_template=True)
  harness = _responses(results, "llada_gen")
  completions = [r["completion"] for r in ours["records"]]
  assert any(completions)
  assert [r[0][0] for r in harness] == [text_lib.cut_at_stops(c, ["plus", "\n\n"]) for c in completions]


def test_fast_sampler_generations_are_evaluates(evaluated):
  from lm_eval.api.instance import Instance

  from llada_jax.eval import tasks
  from llada_jax.harness import options as options_lib

  _, lm = evaluated
  examples = tasks.load_task("gsm8k", TASKS / "gen.jsonl")
  fast = dataclasses.replace(lm.options, cache="dual", threshold=0.5)
  config = options_lib.sampler_config(fast, 8, lm.tokenizer.eot_id)
  assert (config.cache, config.threshold, config.gen_length, config.block_length) == ("dual", 0.5, 8, 4)
  ours = tasks.run_generation(lm.params, lm.model_cfg, lm.tokenizer, examples, config, jax.random.key(3),
                              task="gsm8k", batch_size=4)
  requests = [Instance("generate_until", ex, (ex["prompt"], {"until": [], "max_gen_toks": 64}), 0,
                       ("gen", i, 1)) for i, ex in enumerate(examples)]
  with changed_options(lm, cache="dual", threshold=0.5):
    harness = lm.generate_until(requests)
  assert harness == [r["completion"] for r in ours["records"]]


def test_rolling_likelihood_is_evaluates_whole_text_elbo(evaluated):
  from llada_jax.eval import tasks

  results, lm = evaluated
  examples = tasks.load_task("ppl", TASKS / "text.jsonl")
  ours = tasks.run_perplexity(lm.params, lm.model_cfg, lm.tokenizer, examples, jax.random.key(3), mc_num=8,
                              batch_size=4)
  assert [r[0][0] for r in _responses(results, "llada_ppl")] == [r["elbo"] for r in ours["records"]]


def test_greedy_check_compares_with_the_exact_greedy_sampler(evaluated):
  from lm_eval.api.instance import Instance

  from llada_jax import sampling

  _, lm = evaluated
  with changed_options(lm, check_greedy=True):
    context = lm.apply_chat_template([{"role": "user", "content": "what is 1 plus 2"}])
    prompt = text_lib.markup_ids(lm.tokenizer, context)
    answer = lm.tokenizer.encode("the answer is 3")
    n = len(answer)
    config = sampling.SamplerConfig(gen_length=n, block_length=n, steps=n)
    greedy = np.asarray(sampling.sample_from_ids(lm.params, lm.model_cfg, [prompt], jax.random.key(0),
                                                 config).tokens)[0].tolist()
    assert lm._greedy([prompt, prompt], [greedy, answer], [0, 1]) == [True, greedy == answer]
    request = Instance("loglikelihood", {}, (context, "the answer is 3"), 0, ("t", 0, 1))
    ((score, is_greedy),) = lm.loglikelihood([request])
    assert is_greedy == (greedy == answer) and score < 0
    empty = Instance("loglikelihood", {}, (context, ""), 0, ("t", 1, 1))
    assert lm.loglikelihood([empty]) == [(0.0, True)]


def test_long_texts_are_scored_in_windows_with_their_own_keys(evaluated):
  from lm_eval.api.instance import Instance

  from llada_jax.eval import likelihood
  from llada_jax.harness import model

  _, lm = evaluated
  text = "the big red dog ran on the mat and the small blue cat sat on a hat"
  request = Instance("loglikelihood_rolling", {}, (text,), 0, ("t", 5, 1))
  with changed_options(lm, max_length=8):
    (windowed,) = lm.loglikelihood_rolling([request])
  pieces = text_lib.windows(lm.tokenizer.encode(text), 8)
  assert len(pieces) > 2
  expected = sum(likelihood.score_answers(lm.params, lm.model_cfg, [prompt], [answer],
                                          model.variant_key(lm.root_key, j), mc_num=8, batch_size=4,
                                          example_ids=[5])[0] for j, (prompt, answer) in enumerate(pieces))
  assert windowed == pytest.approx(expected, rel=1e-6)


def test_results_on_a_mesh_are_one_devices(lm_eval, run_dir, evaluated, tmp_path_factory):
  """data=2 x fsdp=2 x tensor=2 over the 8 fake devices: greedy text identical, ELBOs to float32
  rounding of the sharded reductions (as tests/test_sharded_eval.py)."""
  from llada_jax import placement as placement_lib
  from llada_jax.harness import model

  results, lm = evaluated
  mesh_lm = model.LLaDAJaxLM(checkpoint=str(run_dir), fsdp=2, tensor=2, **MODEL_ARGS)
  assert lm.placement is None and mesh_lm.get_model_info()["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  expected = placement_lib.param_shardings(mesh_lm.model_cfg, mesh_lm.placement)
  for leaf, sh in zip(jax.tree_util.tree_leaves(mesh_lm.params), jax.tree_util.tree_leaves(expected)):
    assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
  on_mesh, _ = _simple_evaluate(lm_eval, mesh_lm, tmp_path_factory)
  assert _responses(on_mesh, "llada_gen") == _responses(results, "llada_gen")
  for task in ("llada_mc", "llada_ppl"):
    np.testing.assert_allclose(_scores(on_mesh, task), _scores(results, task), rtol=2e-5)
  assert on_mesh["results"]["llada_mc"]["acc,none"] == results["results"]["llada_mc"]["acc,none"]


def test_mesh_model_args_follow_the_mesh_flags():
  parse = options_lib.parse
  assert options_lib.requested_mesh(parse({"checkpoint": "r"}), 8) is None
  assert options_lib.requested_mesh(parse({"checkpoint": "r", "fsdp": "4"}), 8) == {"data": -1, "fsdp": 4, "tensor": 1}
  cases = [({"fsdp": 3}, "^model_args fsdp=3: the mesh needs a multiple of 3 devices but found 8"),
           ({"tensor": 0}, "^model_args tensor=0: expected a positive number of devices, or -1"),
           ({"data": 2, "fsdp": 2}, "^model_args data=2 fsdp=2: the mesh takes 4 devices but found 8")]
  for args, message in cases:
    with pytest.raises(ModelArgsError, match=message):
      options_lib.requested_mesh(parse({"checkpoint": "r", **args}), 8)


def test_bad_checkpoint_and_tokenizer_name_the_model_arg(lm_eval, run_dir, tmp_path):
  from llada_jax.harness import model

  with pytest.raises(ModelArgsError, match=f"^model_args checkpoint={tmp_path}/none: No checkpoint directory"):
    model.LLaDAJaxLM.create_from_arg_string(f"checkpoint={tmp_path}/none,mc_num=8,batch_size=4", {"batch_size": 1})
  with pytest.raises(ModelArgsError, match=f"^model_args tokenizer={tmp_path}/tok.model: "):
    model.LLaDAJaxLM(checkpoint=str(run_dir), tokenizer=str(tmp_path / "tok.model"))
  with pytest.raises(ModelArgsError, match="unknown argument 'pretrained'"):
    model.LLaDAJaxLM.create_from_arg_obj({"pretrained": "x", "checkpoint": str(run_dir)})


# ------------------------------------------------------------------------------------ no model needed


def test_model_args_are_converted_and_checked():
  opts = options_lib.parse({"checkpoint": "run", "mc_num": "32", "batch_size": 8, "cfg": "0.5",
                            "check_greedy": "true", "threshold": "none", "cache": "dual"})
  assert (opts.mc_num, opts.batch_size, opts.cfg_scale, opts.check_greedy, opts.threshold, opts.cache) == (
      32, 8, 0.5, True, None, "dual")
  cases = [
      ({}, "^model_args: checkpoint is missing; expected checkpoint=RUN_DIR"),
      ({"checkpoint": "r", "mc_numm": 8}, "unknown argument 'mc_numm' \\(did you mean mc_num\\?\\)"),
      ({"checkpoint": "r", "mc_num": "many"}, "^model_args mc_num='many': expected an integer"),
      ({"checkpoint": "r", "check_greedy": "maybe"}, "^model_args check_greedy='maybe': expected true or false"),
      ({"checkpoint": "r", "mc_num": 20, "batch_size": 16}, "^model_args: mc_num=20 with batch_size=16"),
      ({"checkpoint": "r", "cache": "full"}, "^model_args cache='full': expected one of none, prefix, dual"),
      ({"checkpoint": "r", "gen_length": 10, "block_length": 4}, "^model_args block_length=4: expected a divisor"),
      ({"checkpoint": "r", "batch_size": 0}, "^model_args batch_size=0: expected a positive integer"),
      ({"checkpoint": "r", "cfg": 1, "cfg_scale": 2}, "cfg_scale is given twice"),
  ]
  for args, message in cases:
    with pytest.raises(ModelArgsError, match=message):
      options_lib.parse(args)


def test_chat_markup_reads_back_as_the_tokenizers_chat_template(corpus):
  from llada_jax.data import tokenizer as tok_lib

  tok = tok_lib.load_tokenizer(corpus["tokenizer"])
  user = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 1 plus 2"}]
  assert text_lib.markup_ids(tok, text_lib.render_chat(user[1:])) == tok.chat_prompt("what is 1 plus 2")
  assert text_lib.markup_ids(tok, text_lib.render_chat(user)) == tok.encode_chat(user)
  # lm-eval's gen_prefix: the assistant's message is left open for the answer to continue.
  prefixed = user + [{"role": "assistant", "content": "the answer is"}]
  ids = text_lib.markup_ids(tok, text_lib.render_chat(prefixed, add_generation_prompt=False))
  closed = tok.encode_chat(prefixed, add_generation_prompt=False)
  assert closed[-1] == tok.eot_id and ids == closed[:-1]
  # Text that does not start with the BOS marker is plain text, markers and all.
  assert text_lib.markup_ids(tok, "a <|eot_id|> b") == tok.encode("a <|eot_id|> b")


def test_windows_score_every_token_once_within_max_length():
  ids = list(range(23))
  assert text_lib.windows(ids, None) == [([], ids)] and text_lib.windows(ids, 23) == [([], ids)]
  pieces = text_lib.windows(ids, 8)
  assert sum((answer for _, answer in pieces), []) == ids
  assert pieces[0] == ([], ids[:8])
  for prompt, answer in pieces[1:]:
    assert len(prompt) + len(answer) == 8 and prompt == ids[answer[0] - len(prompt):answer[0]]


def test_stop_strings_and_repeats():
  assert text_lib.cut_at_stops("a plus b\n\nc", ["\n\n", "plus"]) == "a "
  assert text_lib.cut_at_stops("abc", ["", "x"]) == "abc"
  assert text_lib.stop_sequences("Q:") == ["Q:"] and text_lib.stop_sequences(None) == []
  with pytest.raises(ValueError, match="until=3"):
    text_lib.stop_sequences(3)
  assert text_lib.occurrence_indices(["a", "b", "a", "a", "b"]) == [0, 0, 1, 2, 1]


@pytest.mark.slow
def test_command_line_runs_and_bad_model_args_fail_in_one_line(lm_eval, run_dir, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
  command = [sys.executable, "-m", "llada_jax.harness", "--model", "llada_jax", "--tasks", "llada_mc",
             "--include_path", str(TASKS), "--model_args"]
  bad = subprocess.run(command + [f"checkpoint={run_dir},mc_num=8,batch_sise=4"], cwd=REPO, env=env,
                       capture_output=True, text=True)
  assert bad.returncode == 1
  assert bad.stderr.splitlines()[-1].startswith("error: model_args: unknown argument 'batch_sise'")
  good = subprocess.run(command + [f"checkpoint={run_dir},mc_num=8,batch_size=4", "--output_path",
                                   str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True)
  assert good.returncode == 0, good.stderr[-2000:]
  assert "llada_mc" in good.stdout and "acc" in good.stdout
  assert list((tmp_path / "out").rglob("results_*.json"))
