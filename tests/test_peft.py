"""Tests for llada_jax.storage.peft: LoRA runs <-> PEFT adapter directories, and the merged export.

One LoRA run is trained (a few steps at a large learning rate, so B is not zero) on a random base and
shared by the module; the PEFT tensors are read back with `safetensors.numpy` and merged in float64
NumPy, apart from llada_jax code.
"""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy as st

from llada_jax import configs, convert, lora
from llada_jax import model as model_lib
from llada_jax.storage import checkpoint as ckpt_lib
from llada_jax.storage import hf_names, huggingface, peft
from tests import train_fixtures

TARGETS = ("q_proj", "v_proj", "attn_out", "ff_proj", "ff_out")  # ff_out: also the LM head's module name
R, ALPHA = 4, 8.0
P = hf_names.PREFIX


def _random_params(cfg, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), model_lib.abstract_params(cfg))


def _save_run(checkpoints: pathlib.Path, config: dict, params, step=0):
  with ckpt_lib.CheckpointManager(checkpoints, async_save=False, metadata={"config": config}) as manager:
    manager.save(step, {"params": params}, force=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A random base run, a LoRA run trained on it, and its PEFT, merged and base exports (float32)."""
  from llada_jax.training import loop  # noqa: PLC0415

  root = tmp_path_factory.mktemp("peft")
  corpus = train_fixtures.write_corpus(root / "corpus")
  base_config = train_fixtures.make_config(corpus, root / "base", "sft")
  base_cfg = model_lib.ModelConfig.from_dict(base_config.model.to_dict())
  _save_run(root / "base" / "checkpoints", base_config.to_dict(), _random_params(base_cfg, 0))
  config = train_fixtures.make_config(corpus, root / "lora", "sft", total_steps=2, **{
      "model.lora_rank": R, "model.lora_alpha": ALPHA, "model.lora_targets": TARGETS, "optimizer.lr": 2e-2,
      "optimizer.warmup_steps": 0, "checkpoint.every_steps": 2,
      "checkpoint.init_from": str(root / "base" / "checkpoints")})
  loop.run(config)
  peft.export_adapters(root / "lora", root / "peft")
  huggingface.export_checkpoint(root / "lora", root / "merged")
  huggingface.export_checkpoint(root / "base", root / "base_hf")
  return root


def _adapters(run):
  cfg = model_lib.ModelConfig.from_dict(peft._run_config(run / "checkpoints", None)[1]["config"]["model"])
  return cfg, ckpt_lib.load_params(run / "checkpoints", lora.split(model_lib.abstract_params(cfg))[0])


def test_peft_export_merges_to_the_merged_export(runs):
  config = json.loads((runs / "peft" / peft.ADAPTER_CONFIG).read_text())
  assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "target_modules", "lora_dropout", "bias",
                                 "fan_in_fan_out", "use_rslora", "base_model_name_or_path", "task_type",
                                 "inference_mode")} == {
      "peft_type": "LORA", "r": R, "lora_alpha": 8, "target_modules": list(TARGETS), "lora_dropout": 0.0,
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
      "base_model_name_or_path": str(runs / "base" / "checkpoints"), "task_type": None, "inference_mode": True}
  assert (config["layers_to_transform"], config["layers_pattern"]) == ([0, 1], "blocks")
  adapters = st.load_file(runs / "peft" / peft.ADAPTER_WEIGHTS)
  base = st.load_file(runs / "base_hf" / "model.safetensors")
  merged = st.load_file(runs / "merged" / "model.safetensors")
  modules = [f"{P}blocks.{i}.{t}" for i in range(2) for t in TARGETS]
  assert sorted(adapters) == sorted(f"base_model.model.{m}.lora_{x}.weight" for m in modules for x in "AB")
  assert set(merged) == set(base)
  scale = ALPHA / R
  for module in modules:
    w = base[module + ".weight"].astype(np.float64)
    a = adapters[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
    b = adapters[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
    assert a.shape == (R, w.shape[1]) and b.shape == (w.shape[0], R)
    update = scale * b @ a
    assert np.abs(update).max() > 1e-3  # trained: the adapters change the weight
    # The merged export is float32: A B summed over r=4 float32 products, scaled, added to W and rounded.
    # Each step rounds once, so the error is a few float32 ulps of |W| + scale |B| |A|; 8 ulps bound it.
    bound = 8 * np.finfo(np.float32).eps * (np.abs(w) + scale * np.abs(b) @ np.abs(a))
    assert np.all(np.abs(merged[module + ".weight"] - (w + update)) <= bound), module
  for name in set(base) - {m + ".weight" for m in modules}:  # norms, embedding, LM head, k/up_proj
    np.testing.assert_array_equal(merged[name], base[name])


def test_merged_export_is_lora_merge_of_base_and_adapters(runs):
  cfg, adapters = _adapters(runs / "lora")
  base_params = ckpt_lib.load_params(runs / "base" / "checkpoints", lora.split(model_lib.abstract_params(cfg))[1])
  merged_params = lora.merge(lora.combine(base_params, adapters), cfg)
  exported = st.load_file(runs / "merged" / "model.safetensors")
  maps = hf_names.tensor_maps(lora.base_config(cfg))
  assert set(exported) == {m.hf_name for m in maps}
  for m in maps:
    leaf = merged_params
    for key in m.param_path:
      leaf = leaf[key]
    np.testing.assert_array_equal(exported[m.hf_name], m.to_hf(np.asarray(leaf)), err_msg=m.hf_name)
  hf_config = json.loads((runs / "merged" / "config.json").read_text())
  assert (hf_config["n_layers"], hf_config["d_model"]) == (cfg.n_layers, cfg.d_model)


def test_import_reproduces_the_adapters_and_the_model(runs, tmp_path):
  cfg = peft.import_adapters(runs / "peft", tmp_path / "run", base=runs / "base")
  assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) == (R, ALPHA, TARGETS)
  assert sorted(os.listdir(tmp_path)) == ["run"]  # no staging directory left
  cfg_in, original = _adapters(runs / "lora")
  cfg_out, imported = _adapters(tmp_path / "run")
  assert cfg_out == cfg_in == cfg
  jax.tree.map(np.testing.assert_array_equal, imported, original)
  model_a, params_a, config_a = ckpt_lib.load_model(runs / "lora")
  model_b, params_b, config_b = ckpt_lib.load_model(tmp_path / "run")
  assert model_b == model_a and model_b.lora_rank == 0
  jax.tree.map(np.testing.assert_array_equal, params_b, params_a)
  assert config_b["checkpoint"]["init_from"] == str(runs / "base" / "checkpoints")
  assert config_b["checkpoint"]["init_step"] == 0 and config_b["workdir"] == str(tmp_path / "run")
  assert config_b["data"]["tokenizer"] == config_a["data"]["tokenizer"]
  peft.export_adapters(tmp_path / "run", tmp_path / "again")  # an imported run exports like a trained one
  again, first = (st.load_file(d / peft.ADAPTER_WEIGHTS) for d in (tmp_path / "again", runs / "peft"))
  assert again.keys() == first.keys()
  jax.tree.map(np.testing.assert_array_equal, again, first)


def test_generate_reads_an_imported_adapter(runs, tmp_path):
  from llada_jax import generate  # noqa: PLC0415

  peft.import_adapters(runs / "peft", tmp_path / "run", base=runs / "base")
  out = tmp_path / "out.jsonl"
  assert generate.main(["--checkpoint", str(tmp_path / "run"), "--prompt", "what is 1 plus 2", "--gen_length", "4",
                        "--steps", "2", "--batch_size", "1", "--output", str(out)]) == 0
  assert isinstance(json.loads(out.read_text().splitlines()[0])["completion"], str)


# --------------------------------------------------------------------------------------------
# Bad adapters: one line naming the file and field or tensor, nothing written.


def _drop(name):
  def edit(tensors):
    del tensors[name]
  return edit


def _head_adapter(tensors):
  tensors[f"base_model.model.{P}ff_out.lora_A.weight"] = np.zeros((R, 32), np.float32)


def _rank(tensors):
  for name in list(tensors):
    tensors[name] = np.concatenate([tensors[name]] * 2, axis=0 if "lora_A" in name else 1)


Q_A = f"base_model.model.{P}blocks.1.q_proj.lora_A.weight"


@pytest.mark.parametrize("config_edit,tensor_edit,match", [
    ({"bias": "lora_only"}, None, r"adapter_config.json: field 'bias' is \"lora_only\"; expected \"none\""),
    ({"use_dora": True}, None, r"adapter_config.json: field 'use_dora' is true; expected false"),
    ({"use_rslora": True}, None, r"field 'use_rslora' is true; expected false"),
    ({"peft_type": "IA3"}, None, r"field 'peft_type' is \"IA3\"; expected \"LORA\""),
    ({"target_modules": ["q_proj", "lm_head"]}, None, r"field 'target_modules' names \"lm_head\"; expected a list"),
    ({"target_modules": ".*q_proj"}, None, r"field 'target_modules' is \"\.\*q_proj\"; expected a list"),
    ({"rank_pattern": {"q_proj": 8}}, None, r"field 'rank_pattern' is \{\"q_proj\": 8\}; expected null or empty"),
    ({"modules_to_save": ["ff_out"]}, None, r"field 'modules_to_save'"),
    ({"r": 0}, None, r"field 'r' is 0; expected a positive integer"),
    ({"lora_dropout": 1.5}, None, r"field 'lora_dropout' is 1.5; expected a rate in \[0, 1\)"),
    ({"layers_to_transform": [2]}, None, r"field 'layers_to_transform' is \[2\]; expected null or layer indices"),
    ({"r": 8}, None, r"adapter_model.safetensors: tensor '.*lora_A.weight' has shape \[4, 32\]; expected \[8, 32\]"),
    ({}, _rank, r"adapter_model.safetensors: tensor '.*lora_A.weight' has shape \[8, 32\]; expected \[4, 32\]"),
    ({}, _drop(Q_A), rf"adapter_model.safetensors: tensor '{Q_A}' is missing"),
    ({}, _head_adapter, r"unexpected tensor 'base_model.model.model.transformer.ff_out.lora_A.weight'"),
])
def test_bad_adapters(runs, tmp_path, config_edit, tensor_edit, match):
  bad = tmp_path / "bad"
  shutil.copytree(runs / "peft", bad)
  config = json.loads((bad / peft.ADAPTER_CONFIG).read_text())
  (bad / peft.ADAPTER_CONFIG).write_text(json.dumps({**config, **config_edit}))
  if tensor_edit:
    tensors = st.load_file(bad / peft.ADAPTER_WEIGHTS)
    tensor_edit(tensors)
    st.save_file(tensors, bad / peft.ADAPTER_WEIGHTS)
  with pytest.raises(huggingface.ConversionError, match=match) as error:
    peft.import_adapters(bad, tmp_path / "run", base=runs / "base")
  assert "\n" not in str(error.value)
  assert sorted(os.listdir(tmp_path)) == ["bad"]


def test_missing_files_and_wrong_runs(runs, tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="adapter_config.json: not found"):
    peft.import_adapters(tmp_path / "empty", tmp_path / "run", base=runs / "base")
  shutil.copy(runs / "peft" / peft.ADAPTER_CONFIG, tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="adapter_model.safetensors: not found"):
    peft.import_adapters(tmp_path / "empty", tmp_path / "run", base=runs / "base")
  with pytest.raises(ValueError, match="--base .*lora_rank is 4; expected a full model"):
    peft.import_adapters(runs / "peft", tmp_path / "run", base=runs / "lora")
  with pytest.raises(ValueError, match="lora_rank is 0; expected a LoRA run"):
    peft.export_adapters(runs / "base", tmp_path / "out")
  with pytest.raises(ValueError, match="already exists and is not empty"):
    peft.export_adapters(runs / "lora", runs / "peft")
  assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_cli(runs, tmp_path, capsys):
  assert convert.main(["export", str(runs / "lora"), str(tmp_path / "peft"), "--peft", "--dtype", "bfloat16"]) == 0
  assert "adapter tensors (r=4" in capsys.readouterr().out
  header = huggingface.read_header(tmp_path / "peft" / peft.ADAPTER_WEIGHTS)
  assert {e.dtype for e in header.values()} == {"BF16"}
  assert convert.main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "run"), "--base",
                       str(runs / "base")]) == 0
  assert "LoRA adapters r=4" in capsys.readouterr().out
  # bfloat16 adapters are imported exactly (to float32).
  _, imported = _adapters(tmp_path / "run")
  a = np.asarray(imported["blocks_0"]["attn"]["q_proj_lora_a"])
  np.testing.assert_array_equal(a.reshape(32, R).T, st.load_file(tmp_path / "peft" / peft.ADAPTER_WEIGHTS)[
      f"base_model.model.{P}blocks.0.q_proj.lora_A.weight"].astype(np.float32))
  for argv, message in [
      (["import-peft", str(tmp_path / "peft"), str(tmp_path / "r2")], "import-peft: expected --base BASE_RUN"),
      (["export", str(runs / "lora"), str(tmp_path / "o"), "--peft", "--max_shard_size", "1GB"],
       "--max_shard_size applies to the merged export, not --peft"),
      (["import", str(tmp_path / "peft"), str(tmp_path / "r2"), "--base", "x"],
       "--base applies to import-peft, not import"),
      (["export", str(runs / "lora"), str(tmp_path / "o"), "--allow_outside_links"],
       "--allow_outside_links applies to import, not export (also to import-peft)"),
      (["import-peft", str(tmp_path / "peft"), str(tmp_path / "run"), "--base", str(runs / "base")],
       "already exists and is not empty"),
  ]:
    assert convert.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


# --------------------------------------------------------------------------------------------
# Scanned layers and partial adapters, on a LoRA checkpoint written directly (no training).


def test_scanned_round_trip_and_partial_layers(tmp_path):
  base_cfg = model_lib.ModelConfig(vocab_size=64, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2,
                                   mlp_hidden_size=24, mask_token_id=3, eos_token_id=2, bos_token_id=1,
                                   scan_layers=True)
  cfg = base_cfg.replace(lora_rank=2, lora_alpha=3.0, lora_targets=("k_proj", "attn_out", "up_proj", "ff_out"))
  config = configs.base_config().to_dict()
  _save_run(tmp_path / "base" / "checkpoints", {**config, "model": vars(base_cfg)}, _random_params(base_cfg, 1))
  adapters = lora.split(_random_params(cfg, 2))[0]
  lora_config = {**config, "model": vars(cfg),
                 "checkpoint": {**config["checkpoint"], "init_from": str(tmp_path / "base" / "checkpoints")}}
  _save_run(tmp_path / "lora" / "checkpoints", lora_config, adapters, step=5)

  peft.export_adapters(tmp_path / "lora", tmp_path / "peft")
  peft.import_adapters(tmp_path / "peft", tmp_path / "back", base=tmp_path / "base")
  jax.tree.map(np.testing.assert_array_equal, _adapters(tmp_path / "back")[1], adapters)
  huggingface.export_checkpoint(tmp_path / "lora", tmp_path / "merged")
  merged = lora.merge(lora.combine(ckpt_lib.load_model(tmp_path / "base")[1], adapters), cfg)
  exported = st.load_file(tmp_path / "merged" / "model.safetensors")
  for m in hf_names.tensor_maps(base_cfg):
    leaf = merged
    for key in m.param_path:
      leaf = leaf[key]
    np.testing.assert_array_equal(exported[m.hf_name], m.to_hf(np.asarray(leaf[m.layer])), err_msg=m.hf_name)

  # An adapter PEFT put on some layers only: the others get exact zeros, i.e. no change.
  config = json.loads((tmp_path / "peft" / peft.ADAPTER_CONFIG).read_text())
  (tmp_path / "peft" / peft.ADAPTER_CONFIG).write_text(json.dumps({**config, "layers_to_transform": [1]}))
  tensors = {k: v for k, v in st.load_file(tmp_path / "peft" / peft.ADAPTER_WEIGHTS).items() if ".blocks.1." in k}
  st.save_file(tensors, tmp_path / "peft" / peft.ADAPTER_WEIGHTS)
  peft.import_adapters(tmp_path / "peft", tmp_path / "partial", base=tmp_path / "base")
  partial = _adapters(tmp_path / "partial")[1]
  for got, want in zip(jax.tree.leaves(partial), jax.tree.leaves(adapters)):
    np.testing.assert_array_equal(np.asarray(got)[1], want[1])
    assert not np.asarray(got)[[0, 2]].any()
