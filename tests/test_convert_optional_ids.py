"""convert import of a directory written by the model's save_pretrained alone: config.json without
bos_token_id and no tokenizer files. BOS is metadata the model never reads; mask and EOS are needed."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from llada_jax import convert
from llada_jax import model as model_lib
from llada_jax.storage import checkpoint as ckpt_lib
from llada_jax.storage import huggingface
from tests.test_convert import hf_config, hf_tensors, write_hf_dir


def _without(config, *fields):
  return {k: v for k, v in config.items() if k not in fields}


@pytest.mark.parametrize("shards", [1, 2], ids=["single_file", "sharded"])
def test_config_without_bos_and_without_tokenizer_imports_the_same_params(tmp_path, shards):
  config = hf_config()
  tensors = hf_tensors(config, seed=3)
  with_bos = write_hf_dir(tmp_path / "with_bos", config, tensors, shards=shards)
  bare = write_hf_dir(tmp_path / "bare", _without(config, "bos_token_id"), tensors, shards=shards)
  assert not [p.name for p in bare.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))]

  cfg_a = huggingface.import_checkpoint(with_bos, tmp_path / "run_a")
  cfg_b = huggingface.import_checkpoint(bare, tmp_path / "run_b")
  assert cfg_a.bos_token_id == 300 and cfg_b.bos_token_id is None
  assert cfg_b == cfg_a.replace(bos_token_id=None)
  assert sorted(p.name for p in (tmp_path / "run_b").iterdir()) == ["checkpoints"]  # no tokenizer to copy

  loaded_cfg, params_b = ckpt_lib.load_model(tmp_path / "run_b")[:2]
  assert loaded_cfg == cfg_b  # the saved run config reads back with BOS unknown
  params_a = ckpt_lib.load_model(tmp_path / "run_a")[1]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params_a, params_b)

  # Export leaves the unknown id out, as save_pretrained did, and the result imports again.
  huggingface.export_checkpoint(tmp_path / "run_b", tmp_path / "out")
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  assert "bos_token_id" not in written and written["mask_token_id"] == 302 and written["eos_token_id"] == 301
  assert huggingface.import_checkpoint(tmp_path / "out", tmp_path / "run_c") == cfg_b


def test_model_config_leaves_bos_unknown():
  cfg = huggingface.model_config_from_hf(_without(hf_config(), "bos_token_id"))
  assert cfg.bos_token_id is None
  assert model_lib.ModelConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
  with pytest.raises(ValueError, match=r"model\.bos_token_id=320: expected an id in \[0, vocab_size=320\)"):
    cfg.replace(bos_token_id=320)  # a given BOS id is still checked


def test_tool_imports_without_bos_and_refuses_a_missing_needed_id(tmp_path, capsys):
  config, tensors = hf_config(), hf_tensors(hf_config())
  bare = write_hf_dir(tmp_path / "bare", _without(config, "bos_token_id"), tensors)
  assert convert.main(["import", str(bare), str(tmp_path / "run")]) == 0
  assert "wrote" in capsys.readouterr().out

  for field in ("mask_token_id", "eos_token_id"):
    hf = write_hf_dir(tmp_path / f"no_{field}", _without(config, "bos_token_id", field), tensors)
    assert convert.main(["import", str(hf), str(tmp_path / f"run_{field}")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("error: ") and f"{hf / 'config.json'}: field '{field}' is missing" in err[0], err
    assert not (tmp_path / f"run_{field}").exists()
