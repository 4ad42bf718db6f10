"""Tests for llada_jax.storage.huggingface and its CLI llada_jax.convert (Hugging Face LLaDA <-> llada_jax),
and the tokenizer.json backend.

Checkpoints are tiny random LLaDA models written with `safetensors.numpy`; the imported model's
logits are checked against a float64 NumPy forward pass computed straight from those tensors by
the formulas of docs/method.md, "Architecture", not through llada_jax code.
"""

import json
import math
import os
import pathlib
import tracemalloc

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as st

from llada_jax.storage import checkpoint as ckpt_lib
from llada_jax import convert
from llada_jax import model as model_lib
from llada_jax.data import DataError
from llada_jax.data import tokenizer as tok_lib
from llada_jax.storage import hf_config as hf_config_lib
from llada_jax.storage import hf_names, huggingface

SPECIAL_TOKENS = (tok_lib.BOS_TOKEN, tok_lib.EOS_TOKEN, tok_lib.MASK_TOKEN, tok_lib.START_HEADER_TOKEN,
                  tok_lib.END_HEADER_TOKEN, tok_lib.EOT_TOKEN)
LLADA_IDS = {tok_lib.BOS_TOKEN: 126080, tok_lib.EOS_TOKEN: 126081, tok_lib.MASK_TOKEN: 126336,
             tok_lib.START_HEADER_TOKEN: 126346, tok_lib.END_HEADER_TOKEN: 126347, tok_lib.EOT_TOKEN: 126348}
CORPUS = ["the cat sat on the mat", "what is 7 plus 5? it is 12.", "hello world\n\nsecond paragraph",
          "naïve café 数据 😀", "Mia has 7 apples. She buys 5 more."] * 20
P = hf_names.PREFIX


# --------------------------------------------------------------------------------------------
# Builders: a tiny tokenizer.json and a Hugging Face LLaDA directory.


def build_tokenizer(path, *, llada_ids=False, special=True, drop=None):
  """A byte-level BPE tokenizer.json with the LLaDA special tokens (next ids, or LLaDA's own)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  spec = json.loads(tok.to_str())
  vocab = spec["model"]["vocab"]
  next_id = max(vocab.values()) + 1
  added = []
  for i, token in enumerate(t for t in SPECIAL_TOKENS if t != drop):
    token_id = LLADA_IDS[token] if llada_ids else next_id + i
    vocab[token] = token_id  # in the model vocabulary too, so the id is kept as written
    added.append({"id": token_id, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": special})
  spec["added_tokens"] = added
  pathlib.Path(path).write_text(json.dumps(spec), encoding="utf-8")
  return str(path)


def hf_config(**overrides):
  """A LLaDA-8B-style config.json for a tiny model."""
  config = dict(hf_config_lib._LLADA_CONFIG_TEMPLATE)  # pylint: disable=protected-access
  config.update(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48, embedding_size=320,
                vocab_size=320, rope_theta=10000.0, rms_norm_eps=1e-5, max_sequence_length=64,
                mask_token_id=302, eos_token_id=301, pad_token_id=301, bos_token_id=300,
                transformers_version="4.46.3")
  config.update(overrides)
  return config


def hf_tensors(config, seed=0):
  """Random float32 tensors with the Hugging Face names and [out, in] shapes of `config`."""
  rng = np.random.default_rng(seed)
  d, m, v = config["d_model"], config["mlp_hidden_size"], config["embedding_size"]
  hd = d // config["n_heads"]
  kv = config["n_kv_heads"] * hd

  def w(*shape, fan_in, scale=1.0):
    return (rng.standard_normal(shape) * scale / math.sqrt(fan_in)).astype(np.float32)

  def norm():
    return (1.0 + 0.2 * rng.standard_normal(d)).astype(np.float32)

  t = {P + "wte.weight": w(v, d, fan_in=1), P + "ln_f.weight": norm(), P + "ff_out.weight": w(v, d, fan_in=d)}
  for i in range(config["n_layers"]):
    b = f"{P}blocks.{i}."
    t.update({b + "attn_norm.weight": norm(), b + "ff_norm.weight": norm(),
              b + "q_proj.weight": w(d, d, fan_in=d, scale=2.0), b + "k_proj.weight": w(kv, d, fan_in=d, scale=2.0),
              b + "v_proj.weight": w(kv, d, fan_in=d), b + "attn_out.weight": w(d, d, fan_in=d),
              b + "ff_proj.weight": w(m, d, fan_in=d), b + "up_proj.weight": w(m, d, fan_in=d),
              b + "ff_out.weight": w(d, m, fan_in=m)})
  return t


def write_hf_dir(path, config, tensors, *, shards=1, tokenizer=None):
  """config.json + model.safetensors, or `shards` files with model.safetensors.index.json."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
  names = list(tensors)
  if shards == 1:
    st.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
  else:
    weight_map = {}
    for k, group in enumerate(np.array_split(np.arange(len(names)), shards)):
      file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
      st.save_file({names[i]: tensors[names[i]] for i in group}, path / file, metadata={"format": "pt"})
      weight_map.update({names[i]: file for i in group})
    total = sum(t.nbytes for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}), encoding="utf-8")
  if tokenizer is not None:
    build_tokenizer(path / "tokenizer.json")
  return path


def read_hf_dir(path):
  """All tensors of an exported directory, through the safetensors library."""
  path = pathlib.Path(path)
  out = {}
  for file in sorted(path.glob("*.safetensors")):
    out.update(st.load_file(file))
  return out


# --------------------------------------------------------------------------------------------
# The float64 reference forward pass (docs/method.md, "Architecture"), from the Hugging Face tensors.


def reference_logits(t, config, tokens):
  t = {k: np.asarray(v, np.float64) for k, v in t.items()}
  d, nh, nkv = config["d_model"], config["n_heads"], config["n_kv_heads"]
  hd, eps = d // nh, config["rms_norm_eps"]
  b_, l_ = tokens.shape

  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

  inv_freq = config["rope_theta"] ** (-np.arange(0, hd, 2) / hd)
  angles = np.arange(l_)[:, None] * inv_freq[None, :]
  angles = np.concatenate([angles, angles], axis=-1)  # [T, hd]
  sin, cos = np.sin(angles)[None, :, None], np.cos(angles)[None, :, None]

  def rope(x):  # rotate_half: the two halves of each head, not interleaved pairs
    rotated = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], axis=-1)
    return x * cos + rotated * sin

  x = t[P + "wte.weight"][tokens]
  for i in range(config["n_layers"]):
    w = lambda n: t[f"{P}blocks.{i}.{n}.weight"]  # noqa: E731
    h = rms(x, w("attn_norm"))
    q = rope((h @ w("q_proj").T).reshape(b_, l_, nh, hd))
    k = rope((h @ w("k_proj").T).reshape(b_, l_, nkv, hd))
    v = (h @ w("v_proj").T).reshape(b_, l_, nkv, hd)
    k, v = np.repeat(k, nh // nkv, axis=2), np.repeat(v, nh // nkv, axis=2)  # torch repeat_interleave
    scores = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)  # no causal mask
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + np.einsum("bhts,bshd->bthd", probs, v).reshape(b_, l_, d) @ w("attn_out").T
    h = rms(x, w("ff_norm"))
    gate = h @ w("ff_proj").T
    x = x + ((gate / (1 + np.exp(-gate))) * (h @ w("up_proj").T)) @ w("ff_out").T
  return rms(x, t[P + "ln_f.weight"]) @ t[P + "ff_out.weight"].T


def random_params(cfg, seed=0):
  """Random parameters as jax arrays (init_params would compile the initialisers: slow on CPU)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jax.numpy.asarray(rng.standard_normal(s.shape).astype(s.dtype)),
                      model_lib.abstract_params(cfg))


def llada_logits(run_dir, tokens):
  cfg, params, _ = ckpt_lib.load_model(run_dir)
  return np.asarray(model_lib.logits_fn(cfg)(params, tokens)), cfg, params


TOKENS = np.random.default_rng(5).integers(0, 320, size=(2, 12)).astype(np.int32)


# --------------------------------------------------------------------------------------------
# Import: logits against the reference.


@pytest.mark.parametrize("n_kv_heads,scan_layers", [(4, False), (2, False), (2, True)])
def test_import_matches_reference_forward(tmp_path, n_kv_heads, scan_layers):
  config = hf_config(n_kv_heads=n_kv_heads)
  tensors = hf_tensors(config, seed=n_kv_heads)
  hf = write_hf_dir(tmp_path / "hf", config, tensors)
  cfg = huggingface.import_checkpoint(hf, tmp_path / "run", scan_layers=scan_layers)
  assert (cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.n_layers, cfg.mlp_hidden_size, cfg.vocab_size) == (
      32, 4, n_kv_heads, 2, 48, 320)
  assert (cfg.mask_token_id, cfg.eos_token_id, cfg.bos_token_id, cfg.rope_theta) == (302, 301, 300, 10000.0)
  ours, loaded_cfg, _ = llada_logits(tmp_path / "run", TOKENS)
  assert loaded_cfg == cfg and loaded_cfg.scan_layers == scan_layers
  ref = reference_logits(tensors, config, TOKENS)
  assert np.abs(ref).max() > 1.0  # logits large enough for layout errors to show
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_reference_forward_detects_a_layout_error(tmp_path):
  """The comparison above can fail: k_proj rows in interleaved instead of head-major order differ."""
  config = hf_config(n_kv_heads=2)
  tensors = hf_tensors(config, seed=2)
  hd = config["d_model"] // config["n_heads"]
  swapped = dict(tensors)
  name = P + "blocks.0.q_proj.weight"
  swapped[name] = tensors[name].reshape(config["n_heads"], hd, -1).transpose(1, 0, 2).reshape(tensors[name].shape)
  huggingface.import_checkpoint(write_hf_dir(tmp_path / "hf", config, swapped), tmp_path / "run")
  ours, _, _ = llada_logits(tmp_path / "run", TOKENS)
  ref = reference_logits(tensors, config, TOKENS)
  assert np.abs(ours - ref).max() > 1e-2 * np.abs(ref).max()


def test_imported_run_is_a_run_directory(tmp_path):
  config = hf_config()
  tensors = hf_tensors(config)
  hf = write_hf_dir(tmp_path / "hf", config, tensors, tokenizer=True)
  cfg = huggingface.import_checkpoint(hf, tmp_path / "run")
  run = tmp_path / "run"
  assert sorted(os.listdir(run)) == ["checkpoints", "tokenizer.json"]
  assert sorted(os.listdir(run / "checkpoints")) == ["0"]
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]
  # What training's init_from / reference_from and the evaluation tools read.
  params = ckpt_lib.load_params(run / "checkpoints", model_lib.abstract_params(cfg))
  np.testing.assert_array_equal(np.asarray(params["blocks_1"]["mlp"]["up_proj"]),
                                tensors[P + "blocks.1.up_proj.weight"].T)
  with ckpt_lib.CheckpointManager(run / "checkpoints", read_only=True) as manager:
    metadata = manager.read_metadata()
    state = manager.restore(abstract_state={"params": model_lib.abstract_params(cfg)})
  np.testing.assert_array_equal(np.asarray(state["params"]["wte"]), tensors[P + "wte.weight"])
  assert metadata["config"]["data"]["tokenizer"] == str(run / "tokenizer.json")
  assert metadata["config"]["workdir"] == str(run)
  assert metadata["huggingface"]["config"] == config
  assert model_lib.ModelConfig.from_dict(metadata["config"]["model"]) == cfg
  tok = tok_lib.load_tokenizer(run)
  assert (tok.mask_id, tok.eos_id, tok.bos_id) == (cfg.mask_token_id, cfg.eos_token_id, cfg.bos_token_id)


def test_imported_run_restores_onto_a_mesh(tmp_path):
  """Training's init_from restores onto sharded targets; the leaves were written as numpy arrays."""
  config = hf_config()
  tensors = hf_tensors(config)
  cfg = huggingface.import_checkpoint(write_hf_dir(tmp_path / "hf", config, tensors), tmp_path / "run",
                                      scan_layers=True)
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))

  def sharded(x):
    axis = next((i for i, n in enumerate(x.shape) if n % 8 == 0), None)
    spec = [None] * len(x.shape)
    if axis is not None:
      spec[axis] = "fsdp"
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, jax.P(*spec)))

  target = jax.tree.map(sharded, model_lib.abstract_params(cfg))
  params = ckpt_lib.load_params(tmp_path / "run" / "checkpoints", target)
  up = params["blocks"]["block"]["mlp"]["up_proj"]
  assert len(up.sharding.device_set) == 8
  for layer in range(2):
    np.testing.assert_array_equal(np.asarray(up[layer]), tensors[f"{P}blocks.{layer}.up_proj.weight"].T)


def test_generate_runs_on_an_imported_checkpoint(tmp_path):
  from llada_jax import generate

  config = hf_config()
  hf = write_hf_dir(tmp_path / "hf", config, hf_tensors(config), tokenizer=True)
  huggingface.import_checkpoint(hf, tmp_path / "run")
  out = tmp_path / "out.jsonl"
  rc = generate.main(["--checkpoint", str(tmp_path / "run"), "--prompt", "what is 7 plus 5?", "--chat_template",
                      "--gen_length", "8", "--steps", "4", "--batch_size", "1", "--output", str(out)])
  assert rc == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert rows[0]["prompt"] == "what is 7 plus 5?" and isinstance(rows[0]["completion"], str)


# --------------------------------------------------------------------------------------------
# Round trips, shards, bfloat16.


def _check_index(out_dir, tensors_expected):
  index = json.loads((out_dir / "model.safetensors.index.json").read_text())
  weight_map = index["weight_map"]
  files = sorted(p.name for p in out_dir.glob("*.safetensors"))
  assert sorted(set(weight_map.values())) == files and len(files) > 1
  held = {}
  for file in files:
    for name in st.load_file(out_dir / file):
      assert name not in held  # every tensor in one file only
      held[name] = file
  assert held == weight_map and set(weight_map) == set(tensors_expected)
  total = sum(t.nbytes for t in read_hf_dir(out_dir).values())
  assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize("scan_layers", [False, True])
def test_round_trip_is_bit_identical(tmp_path, scan_layers):
  config = hf_config()
  tensors = hf_tensors(config, seed=7)
  hf = write_hf_dir(tmp_path / "hf", config, tensors, shards=3)  # sharded input
  huggingface.import_checkpoint(hf, tmp_path / "run", scan_layers=scan_layers)
  max_shard = 40_000  # several output shards for a ~100 KB model
  summary = huggingface.export_checkpoint(tmp_path / "run", tmp_path / "out", max_shard_size=max_shard)
  out = tmp_path / "out"
  exported = read_hf_dir(out)
  assert set(exported) == set(tensors)
  for name, t in tensors.items():
    assert exported[name].dtype == np.float32 and exported[name].tobytes() == t.tobytes(), name
  _check_index(out, tensors)
  largest = max(t.nbytes for t in tensors.values())
  for file in summary["files"]:
    data = sum(t.nbytes for t in st.load_file(out / file).values())
    assert data <= max(max_shard, largest)
  written = json.loads((out / "config.json").read_text())
  for key, value in config.items():
    assert written[key] == value, key
  assert written["torch_dtype"] == "float32" and written["bos_token_id"] == 300
  # And back again: the exported directory imports to the same parameters.
  huggingface.import_checkpoint(out, tmp_path / "run2", scan_layers=scan_layers)
  p1 = ckpt_lib.load_model(tmp_path / "run")[1]
  p2 = ckpt_lib.load_model(tmp_path / "run2")[1]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p1, p2)


def test_sharded_and_single_file_inputs_import_alike(tmp_path):
  config = hf_config()
  tensors = hf_tensors(config, seed=3)
  huggingface.import_checkpoint(write_hf_dir(tmp_path / "one", config, tensors), tmp_path / "run1")
  huggingface.import_checkpoint(write_hf_dir(tmp_path / "four", config, tensors, shards=4), tmp_path / "run4")
  p1, p4 = ckpt_lib.load_model(tmp_path / "run1")[1], ckpt_lib.load_model(tmp_path / "run4")[1]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p1, p4)


def test_bfloat16_input(tmp_path):
  config = hf_config(torch_dtype="bfloat16")
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf_tensors(config, seed=4).items()}
  hf = write_hf_dir(tmp_path / "hf", config, tensors)
  # float32 parameters hold the bfloat16 values exactly.
  huggingface.import_checkpoint(hf, tmp_path / "f32")
  cfg, params, _ = ckpt_lib.load_model(tmp_path / "f32")
  assert cfg.param_dtype == "float32"
  q = np.asarray(params["blocks_0"]["attn"]["q_proj"])
  assert q.dtype == np.float32
  np.testing.assert_array_equal(q, tensors[P + "blocks.0.q_proj.weight"].astype(np.float32).T.reshape(q.shape))
  # bfloat16 parameters are kept bit for bit, and export back to the same bytes.
  huggingface.import_checkpoint(hf, tmp_path / "bf16", param_dtype="bfloat16")
  cfg, params, _ = ckpt_lib.load_model(tmp_path / "bf16")
  assert cfg.param_dtype == "bfloat16" and params["wte"].dtype == jax.numpy.bfloat16
  for run in ("f32", "bf16"):
    huggingface.export_checkpoint(tmp_path / run, tmp_path / f"out_{run}", dtype="bfloat16")
    exported = read_hf_dir(tmp_path / f"out_{run}")
    for name, t in tensors.items():
      assert exported[name].dtype == ml_dtypes.bfloat16 and exported[name].tobytes() == t.tobytes(), (run, name)
    assert json.loads((tmp_path / f"out_{run}" / "config.json").read_text())["torch_dtype"] == "bfloat16"
  # float32 -> bfloat16 on export rounds to nearest even, as torch's .to(torch.bfloat16).
  config32 = hf_config()
  t32 = hf_tensors(config32, seed=9)
  huggingface.import_checkpoint(write_hf_dir(tmp_path / "hf32", config32, t32), tmp_path / "r32")
  huggingface.export_checkpoint(tmp_path / "r32", tmp_path / "o32", dtype="bfloat16")
  exported = read_hf_dir(tmp_path / "o32")
  for name, t in t32.items():
    assert exported[name].tobytes() == t.astype(ml_dtypes.bfloat16).tobytes(), name


def test_export_of_a_training_checkpoint(tmp_path):
  """A checkpoint saved like train.py saves one (jax arrays in a train state), exported and re-imported."""
  from llada_jax import configs

  cfg = model_lib.ModelConfig(vocab_size=48, d_model=16, n_layers=2, n_heads=4, n_kv_heads=1, mlp_hidden_size=24,
                              rope_theta=500000.0, mask_token_id=47, eos_token_id=1, bos_token_id=2)
  params = random_params(cfg, seed=3)
  config = configs.base_config().to_dict()
  config["model"] = dict(vars(cfg))
  state = {"params": params, "step": np.int32(7), "opt_state": {"mu": jax.tree.map(np.zeros_like, params)}}
  with ckpt_lib.CheckpointManager(tmp_path / "train" / "checkpoints", metadata={"config": config}) as manager:
    manager.save(5, state, force=True)
    manager.save(7, state, force=True)
  summary = huggingface.export_checkpoint(tmp_path / "train", tmp_path / "hf", step=5)
  assert summary["step"] == 5 and summary["files"] == ["model.safetensors"]
  assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()
  exported = read_hf_dir(tmp_path / "hf")
  d, hd = 16, 4
  np.testing.assert_array_equal(exported[P + "blocks.1.k_proj.weight"],
                                np.asarray(params["blocks_1"]["attn"]["k_proj"]).reshape(d, 1 * hd).T)
  np.testing.assert_array_equal(exported[P + "blocks.0.attn_out.weight"],
                                np.asarray(params["blocks_0"]["attn"]["attn_out"]).reshape(4 * hd, d).T)
  np.testing.assert_array_equal(exported[P + "ff_out.weight"], np.asarray(params["ff_out"]).T)
  assert exported[P + "blocks.1.k_proj.weight"].shape == (hd, d)
  written = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert (written["model_type"], written["architectures"], written["n_kv_heads"], written["embedding_size"],
          written["mask_token_id"], written["eos_token_id"], written["pad_token_id"], written["bos_token_id"]) == (
              "llada", ["LLaDAModelLM"], 1, 48, 47, 1, 1, 2)
  assert written["auto_map"]["AutoModel"] == "modeling_llada.LLaDAModelLM"
  assert huggingface.model_config_from_hf(written) == cfg
  huggingface.import_checkpoint(tmp_path / "hf", tmp_path / "back")
  back = ckpt_lib.load_model(tmp_path / "back")[1]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, back)


def test_export_copies_support_files(tmp_path):
  config = hf_config()
  hf = write_hf_dir(tmp_path / "hf", config, hf_tensors(config), tokenizer=True)
  (hf / "modeling_llada.py").write_text("# model code\n")
  (hf / "configuration_llada.py").write_text("# config code\n")
  huggingface.import_checkpoint(hf, tmp_path / "run")
  huggingface.export_checkpoint(tmp_path / "run", tmp_path / "out", copy_from=hf)
  names = sorted(os.listdir(tmp_path / "out"))
  assert names == ["config.json", "configuration_llada.py", "model.safetensors", "modeling_llada.py", "tokenizer.json"]


def test_safetensors_writer_is_read_by_the_library(tmp_path):
  arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((5,), ml_dtypes.bfloat16),
            "c": np.arange(6, dtype=np.float32).reshape(2, 3).T}  # non-contiguous
  specs = [(k, np.dtype(v.dtype), v.shape) for k, v in arrays.items()]
  huggingface.write_safetensors(tmp_path / "x.safetensors", specs, arrays.__getitem__, metadata={"format": "pt"})
  loaded = st.load_file(tmp_path / "x.safetensors")
  for k, v in arrays.items():
    assert loaded[k].dtype == v.dtype
    np.testing.assert_array_equal(loaded[k], v)
  header = huggingface.read_header(tmp_path / "x.safetensors")
  np.testing.assert_array_equal(huggingface.read_tensor(header["c"]), arrays["c"])


def test_parse_size():
  assert huggingface.parse_size("5GB") == 5 * 10**9
  assert huggingface.parse_size("500MB") == 500 * 10**6
  assert huggingface.parse_size("2GiB") == 2 * 2**30
  assert huggingface.parse_size("1000") == 1000
  with pytest.raises(ValueError, match="max_shard_size"):
    huggingface.parse_size("lots")


# --------------------------------------------------------------------------------------------
# Memory: tensors held at once stay below one shard plus one tensor.


def _measure(fn):
  """(peak bytes the converter's HeldBytes meter saw, tracemalloc peak of Python + NumPy allocations)."""
  meter = huggingface.HeldBytes()
  tracemalloc.start()
  try:
    fn(meter)
    _, traced = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  return meter.peak, traced


def _warm_up(tmp_path):
  # A first small conversion imports the lazily imported modules, which tracemalloc would count.
  small = hf_config()
  huggingface.import_checkpoint(write_hf_dir(tmp_path / "small", small, hf_tensors(small)), tmp_path / "small_run")
  huggingface.export_checkpoint(tmp_path / "small_run", tmp_path / "small_out")


def test_conversion_holds_about_one_tensor_at_a_time(tmp_path):
  config = hf_config(d_model=256, n_heads=4, n_kv_heads=4, n_layers=4, mlp_hidden_size=512, embedding_size=4096,
                     vocab_size=4096)
  tensors = hf_tensors(config, seed=11)
  total = sum(t.nbytes for t in tensors.values())  # 19 MB
  hf = write_hf_dir(tmp_path / "hf", config, tensors, shards=5)
  largest_file = max(sum(t.nbytes for t in st.load_file(f).values()) for f in hf.glob("*.safetensors"))
  largest_tensor = max(t.nbytes for t in tensors.values())  # 4 MB: embedding and LM head
  bound = largest_file + largest_tensor
  del tensors
  _warm_up(tmp_path)

  held, traced = _measure(lambda m: huggingface.import_checkpoint(hf, tmp_path / "run", meter=m))
  print(f"import: model {total / 1e6:.1f} MB, largest file {largest_file / 1e6:.1f} MB, largest tensor "
        f"{largest_tensor / 1e6:.1f} MB; held {held / 1e6:.1f} MB, traced Python+NumPy peak {traced / 1e6:.1f} MB")
  assert largest_tensor <= held <= largest_tensor + 1024
  assert traced < bound < total
  held, traced = _measure(lambda m: huggingface.export_checkpoint(tmp_path / "run", tmp_path / "out", meter=m,
                                                              max_shard_size="5MB"))
  print(f"export: held {held / 1e6:.1f} MB, traced Python+NumPy peak {traced / 1e6:.1f} MB")
  assert largest_tensor <= held <= largest_tensor + 1024
  assert traced < bound


def test_scanned_conversion_memory(tmp_path):
  """Import writes a scanned (stacked) leaf layer by layer; export restores a stacked leaf whole."""
  config = hf_config(d_model=128, n_heads=4, n_kv_heads=4, n_layers=4, mlp_hidden_size=4096, embedding_size=512,
                     vocab_size=512)
  tensors = hf_tensors(config, seed=12)
  largest_tensor = max(t.nbytes for t in tensors.values())  # 2 MB: one layer's MLP matrix
  hf = write_hf_dir(tmp_path / "hf", config, tensors, shards=4)
  _warm_up(tmp_path)
  held, traced = _measure(lambda m: huggingface.import_checkpoint(hf, tmp_path / "run", scan_layers=True, meter=m))
  print(f"scanned import: largest tensor {largest_tensor / 1e6:.1f} MB, a stacked leaf "
        f"{4 * largest_tensor / 1e6:.1f} MB; held {held / 1e6:.1f} MB, traced peak {traced / 1e6:.1f} MB")
  assert largest_tensor <= held <= largest_tensor + 1024
  assert traced < 2 * largest_tensor
  held, _ = _measure(lambda m: huggingface.export_checkpoint(tmp_path / "run", tmp_path / "out", meter=m))
  assert held <= 4 * largest_tensor + 1024
  exported = read_hf_dir(tmp_path / "out")
  assert all(exported[k].tobytes() == v.tobytes() for k, v in tensors.items())


# --------------------------------------------------------------------------------------------
# Errors: each names the file, tensor or field, and a failure leaves nothing behind.


@pytest.fixture
def good(tmp_path):
  config = hf_config()
  return config, hf_tensors(config)


def _import_error(tmp_path, config, tensors, match, exc=huggingface.ConversionError, **kw):
  hf = write_hf_dir(tmp_path / "hf", config, tensors, **kw)
  with pytest.raises(exc, match=match):
    huggingface.import_checkpoint(hf, tmp_path / "run")
  assert not (tmp_path / "run").exists()
  return hf


def test_missing_config(tmp_path, good):
  hf = write_hf_dir(tmp_path / "hf", *good)
  (hf / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json"):
    huggingface.import_checkpoint(hf, tmp_path / "run")


def test_missing_weights(tmp_path, good):
  hf = write_hf_dir(tmp_path / "hf", *good)
  (hf / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
    huggingface.import_checkpoint(hf, tmp_path / "run")


def test_shards_without_index(tmp_path, good):
  hf = write_hf_dir(tmp_path / "hf", *good, shards=2)
  (hf / "model.safetensors.index.json").unlink()
  with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors but no model.safetensors.index"):
    huggingface.import_checkpoint(hf, tmp_path / "run")


def test_index_names_a_missing_shard(tmp_path, good):
  hf = write_hf_dir(tmp_path / "hf", *good, shards=3)
  (hf / "model-00002-of-00003.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="shard 'model-00002-of-00003.safetensors'.*does not exist"):
    huggingface.import_checkpoint(hf, tmp_path / "run")


def test_index_lists_a_tensor_in_the_wrong_shard(tmp_path, good):
  hf = write_hf_dir(tmp_path / "hf", *good, shards=2)
  index = json.loads((hf / "model.safetensors.index.json").read_text())
  index["weight_map"][P + "wte.weight"] = "model-00002-of-00002.safetensors"
  (hf / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(huggingface.ConversionError, match="'model.transformer.wte.weight' is listed in "
                                                    "'model-00002-of-00002.safetensors', which does not hold it"):
    huggingface.import_checkpoint(hf, tmp_path / "run")


def test_missing_tensor(tmp_path, good):
  config, tensors = good
  del tensors[P + "blocks.1.up_proj.weight"]
  _import_error(tmp_path, config, tensors, r"tensor 'model.transformer.blocks.1.up_proj.weight' is missing")


def test_unexpected_tensor(tmp_path, good):
  config, tensors = good
  tensors[P + "blocks.0.q_proj.bias"] = np.zeros(32, np.float32)
  _import_error(tmp_path, config, tensors, r"unexpected tensor 'model.transformer.blocks.0.q_proj.bias'")


def test_extra_layer_is_unexpected(tmp_path, good):
  config, tensors = good
  tensors.update({k.replace("blocks.1.", "blocks.2."): v for k, v in tensors.items() if "blocks.1." in k})
  _import_error(tmp_path, config, tensors, r"unexpected tensor 'model.transformer.blocks.2.")


def test_shape_mismatch(tmp_path, good):
  config, tensors = good
  tensors[P + "blocks.0.k_proj.weight"] = np.zeros((32, 32), np.float32)  # config says 2 kv heads: [16, 32]
  _import_error(tmp_path, config, tensors,
                r"tensor 'model.transformer.blocks.0.k_proj.weight' has shape \[32, 32\]; expected \[16, 32\]")


@pytest.mark.parametrize("field,value,absent", [
    ("include_bias", True, False),
    ("layer_norm_type", "default", False),
    ("rope", False, False),
    ("rope", None, True),  # absent: the reference default (false) applies
    ("activation_type", "swiglu", False),
    ("block_type", "sequential", False),
    ("weight_tying", True, False),
    ("attention_layer_norm", True, False),
    ("scale_logits", True, False),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, False),
    ("block_group_size", 2, False),
    ("model_type", "llama", False),
    ("n_heads", 5, False),
])
def test_unsupported_config_value(tmp_path, good, field, value, absent):
  config, tensors = good
  config = dict(config)
  if absent:
    del config[field]
  else:
    config[field] = value
  hf = _import_error(tmp_path, config, tensors, rf"config.json: field '{field}' is .*llada_jax supports")
  with pytest.raises(huggingface.ConversionError, match=f"'{field}'"):
    huggingface.model_config_from_hf(json.loads((hf / "config.json").read_text()))


def test_missing_size_field(tmp_path, good):
  config, tensors = good
  del config["d_model"]
  _import_error(tmp_path, config, tensors, "field 'd_model' is missing")


def test_special_ids_from_config_or_tokenizer(tmp_path, good):
  config, tensors = good
  config = dict(config)
  del config["bos_token_id"]
  # Mask and EOS are needed: without them in config.json or a tokenizer the import is refused.
  # (Without BOS it goes on: tests/test_convert_optional_ids.py.)
  _import_error(tmp_path, {k: v for k, v in config.items() if k != "mask_token_id"}, tensors,
                r"config\.json: field 'mask_token_id' is missing and no tokenizer.json gives it")
  # The tokenizer gives the BOS id (300) and agrees with the mask and EOS ids of config.json.
  hf = write_hf_dir(tmp_path / "hf2", config, tensors, tokenizer=True)
  assert huggingface.import_checkpoint(hf, tmp_path / "run2").bos_token_id == 300
  config["mask_token_id"] = 7
  hf = write_hf_dir(tmp_path / "hf3", config, tensors, tokenizer=True)
  with pytest.raises(huggingface.ConversionError, match="field 'mask_token_id' is 7 but the tokenizer .* gives 302"):
    huggingface.import_checkpoint(hf, tmp_path / "run3")


def test_failed_import_leaves_nothing(tmp_path, good, monkeypatch):
  hf = write_hf_dir(tmp_path / "hf", *good)
  calls = []
  real = huggingface.read_tensor

  def failing(entry):
    calls.append(entry.name)
    if len(calls) == 6:
      raise OSError("disk on fire")
    return real(entry)

  monkeypatch.setattr(huggingface, "read_tensor", failing)
  with pytest.raises(Exception, match="disk on fire"):
    huggingface.import_checkpoint(hf, tmp_path / "run")
  assert len(calls) == 6  # failed halfway through writing
  assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_existing_destination_is_not_overwritten(tmp_path, good):
  hf = write_hf_dir(tmp_path / "hf", *good)
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "keep.txt").write_text("mine")
  with pytest.raises(ValueError, match="already exists and is not empty"):
    huggingface.import_checkpoint(hf, tmp_path / "run")
  assert os.listdir(tmp_path / "run") == ["keep.txt"]
  huggingface.import_checkpoint(hf, tmp_path / "empty_ok")
  with pytest.raises(ValueError, match="already exists and is not empty"):
    huggingface.export_checkpoint(tmp_path / "empty_ok", tmp_path / "run")


def test_export_errors(tmp_path, good, monkeypatch):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    huggingface.export_checkpoint(tmp_path / "nothing", tmp_path / "out")
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError):
    huggingface.export_checkpoint(tmp_path / "empty", tmp_path / "out")
  huggingface.import_checkpoint(write_hf_dir(tmp_path / "hf", *good), tmp_path / "run")
  with pytest.raises(FileNotFoundError, match="step 3"):
    huggingface.export_checkpoint(tmp_path / "run", tmp_path / "out", step=3)
  real = huggingface.write_safetensors
  calls = []

  def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise OSError("disk full")
    return real(*args, **kwargs)

  monkeypatch.setattr(huggingface, "write_safetensors", failing)
  with pytest.raises(OSError, match="disk full"):
    huggingface.export_checkpoint(tmp_path / "run", tmp_path / "out", max_shard_size=30_000)
  assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]


def test_export_rejects_a_checkpoint_that_does_not_match_its_config(tmp_path):
  from llada_jax import configs

  cfg = model_lib.ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, mlp_hidden_size=8, mask_token_id=3,
                              eos_token_id=1, bos_token_id=2)
  params = random_params(cfg)
  config = configs.base_config().to_dict()
  config["model"] = dict(vars(cfg), mlp_hidden_size=12)
  with ckpt_lib.CheckpointManager(tmp_path / "run" / "checkpoints", metadata={"config": config}) as manager:
    manager.save(1, {"params": params}, force=True)
  with pytest.raises(huggingface.ConversionError,
                     match=r"'params.blocks_0.mlp.ff_proj' has shape \[8, 8\]; expected \[8, 12\]"):
    huggingface.export_checkpoint(tmp_path / "run", tmp_path / "out")


def test_cli(tmp_path, good, capsys):
  hf = write_hf_dir(tmp_path / "hf", *good)
  assert convert.main(["import", str(hf), str(tmp_path / "run"), "--param_dtype", "bfloat16"]) == 0
  assert "wrote" in capsys.readouterr().out
  assert convert.main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--dtype", "bfloat16",
                       "--max_shard_size", "20KB"]) == 0
  assert (tmp_path / "out" / "model.safetensors.index.json").exists()
  assert convert.main(["import", str(tmp_path / "nope"), str(tmp_path / "run9")]) == 1
  assert "error:" in capsys.readouterr().err
  # Flags and positional arguments are checked per command, in one line each.
  assert convert.main(["import", str(hf), str(tmp_path / "run8"), "--step", "3"]) == 1
  assert capsys.readouterr().err.strip() == "error: --step applies to export, not import"
  assert convert.main(["export", str(tmp_path / "run")]) == 1
  assert capsys.readouterr().err.strip() == f"error: export: expected RUN_DIR HF_DIR, got {tmp_path / 'run'}"
  assert convert.main(["--dtype", "float16", "export", str(tmp_path / "run"), str(tmp_path / "out2")]) == 1
  assert "--dtype" in capsys.readouterr().err
  assert convert.main(["--help"]) == 0
  assert "--max_shard_size" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# The tokenizer.json backend


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
  path = build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  return tok_lib.load_tokenizer(path)


@pytest.fixture(scope="module")
def llada_tok(tmp_path_factory):
  d = tmp_path_factory.mktemp("llada_tok")
  build_tokenizer(d / "tokenizer.json", llada_ids=True)
  return tok_lib.load_tokenizer(d)  # a directory holding tokenizer.json


TEXTS = ["the cat sat on the mat", "", "  leading and trailing  ", "line\n\nbreaks\n", "naïve café 数据 😀 42",
         "what is 7 plus 5?"]


@pytest.mark.parametrize("which", ["hf_tok", "llada_tok"])
def test_hf_tokenizer_round_trip(request, which):
  tok = request.getfixturevalue(which)
  assert isinstance(tok, tok_lib.HuggingFaceTokenizer)
  for text in TEXTS:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert not set(ids) & set(tok.special_ids.values())
    assert tok.decode(ids) == text
  assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
  assert tok.encode_batch([]) == []


def test_hf_tokenizer_special_ids(hf_tok, llada_tok):
  assert llada_tok.special_ids == {"mask": 126336, "eos": 126081, "bos": 126080, "eot": 126348,
                                   "start_header": 126346, "end_header": 126347}
  assert llada_tok.pad_id == 126081 and llada_tok.vocab_size == 126349
  tok_lib.check_vocab(llada_tok, 126464)  # fits LLaDA-8B's embedding
  with pytest.raises(ValueError, match="does not fit"):
    tok_lib.check_vocab(llada_tok, 126000)
  ids = hf_tok.special_ids
  assert sorted(ids.values()) == list(range(hf_tok.vocab_size - 6, hf_tok.vocab_size))
  assert (ids["bos"], ids["eos"], ids["mask"]) == (300, 301, 302)  # what hf_config() declares


@pytest.mark.parametrize("which", ["hf_tok", "llada_tok"])
def test_special_token_text_in_user_input_stays_text(request, which):
  tok = request.getfixturevalue(which)
  text = f"a {tok_lib.EOT_TOKEN} b {tok_lib.MASK_TOKEN}"
  ids = tok.encode(text)
  assert not set(ids) & set(tok.special_ids.values())
  assert tok.decode(ids) == text


@pytest.mark.parametrize("which", ["hf_tok", "llada_tok"])
def test_hf_tokenizer_chat_template(request, which):
  """encode_chat gives the ids of the LLaDA chat template string tokenized with special tokens matched."""
  from tokenizers import Tokenizer

  tok = request.getfixturevalue(which)
  raw = Tokenizer.from_file(tok.path)  # matches special tokens in text, as apply_chat_template's output is read
  messages = [{"role": "user", "content": "what is 7 plus 5?"}, {"role": "assistant", "content": "12"},
              {"role": "user", "content": "and 3 more?"}]
  text = ("<|startoftext|>" + "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                                      for m in messages)
          + "<|start_header_id|>assistant<|end_header_id|>\n\n")
  ids = tok.encode_chat(messages)
  assert ids == raw.encode(text, add_special_tokens=False).ids
  assert tok.decode(ids, skip_special=False) == text
  assert tok.decode(ids) == "user\n\nwhat is 7 plus 5?assistant\n\n12user\n\nand 3 more?assistant\n\n"
  prompt = tok.chat_prompt("hi")
  assert prompt[0] == tok.bos_id and prompt.count(tok.eot_id) == 1 and prompt.count(tok.start_header_id) == 2
  assert tok.decode(prompt, skip_special=False) == (
      "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_hf_tokenizer_decode_rejects_unknown_ids(llada_tok):
  with pytest.raises(ValueError, match="not in the vocabulary"):
    llada_tok.decode([126349])
  with pytest.raises(ValueError, match="not in the vocabulary"):
    llada_tok.decode([1000])  # a gap below the LLaDA special ids in this test vocabulary
  with pytest.raises(ValueError, match="not in the vocabulary"):
    llada_tok.decode([-1])


def test_hf_tokenizer_errors(tmp_path):
  with pytest.raises(DataError, match="special token '<\\|mdm_mask\\|>' is not in the vocabulary"):
    tok_lib.load_tokenizer(build_tokenizer(tmp_path / "a.json", drop=tok_lib.MASK_TOKEN))
  with pytest.raises(DataError, match="is not an added token marked special"):
    tok_lib.load_tokenizer(build_tokenizer(tmp_path / "b.json", special=False))
  (tmp_path / "c.json").write_text("{not json")
  with pytest.raises(DataError, match="not a Hugging Face tokenizer.json"):
    tok_lib.load_tokenizer(tmp_path / "c.json")
  with pytest.raises(DataError, match="tokenizer file not found"):
    tok_lib.load_tokenizer(tmp_path / "missing.json")
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="directory has no tokenizer.json"):
    tok_lib.load_tokenizer(tmp_path / "empty")


def test_load_tokenizer_still_loads_sentencepiece(tmp_path):
  (tmp_path / "a.txt").write_text("\n".join(CORPUS), encoding="utf-8")
  sp = tok_lib.train_sentencepiece([tmp_path / "a.txt"], tmp_path / "sp", vocab_size=300)
  tok = tok_lib.load_tokenizer(tmp_path / "sp.model")
  assert isinstance(tok, tok_lib.SentencePieceTokenizer) and tok.special_ids == sp.special_ids
