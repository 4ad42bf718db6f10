"""config.json of a Hugging Face LLaDA checkpoint <-> the llada_jax ModelConfig.

Import accepts only configurations the llada_jax model reproduces exactly and names the field
otherwise; export writes a config.json for the reference `modeling_llada.py`.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, NoReturn

from llada_jax import model as model_lib
from llada_jax.storage.hf_safetensors import ConversionError, decode_error

CONFIG_FILE = "config.json"
PARAM_DTYPES = ("float32", "bfloat16")

# What the reference configuration_llada.ModelConfig uses when config.json leaves a field out:
# a missing field means the reference default, not the LLaDA-8B value.
_REFERENCE_DEFAULTS = {
    "n_kv_heads": None, "multi_query_attention": None, "mlp_ratio": 4, "mlp_hidden_size": None,
    "activation_type": "swiglu", "block_type": "sequential", "block_group_size": 1, "alibi": False,
    "rope": False, "attention_layer_norm": False, "input_emb_norm": False, "layer_norm_type": "default",
    "layer_norm_with_affine": True, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "include_qkv_bias": False,
    "include_bias": False, "bias_for_layer_norm": None, "scale_logits": False, "embedding_size": 50304,
    "weight_tying": True,
}

# (field, accepted value, what to say): configurations the llada_jax model reproduces exactly.
_SUPPORTED = (
    ("block_type", "llama", '"llama" (q/k/v projections, SwiGLU with a separate up_proj)'),
    ("activation_type", "silu", '"silu" (with block_type "llama" this is SwiGLU)'),
    ("layer_norm_type", "rms", '"rms" (RMSNorm)'),
    ("layer_norm_with_affine", True, "true (RMSNorm with a weight)"),
    ("include_bias", False, "false (no biases)"),
    ("include_qkv_bias", False, "false (no biases)"),
    ("bias_for_layer_norm", False, "false or null (no norm biases)"),
    ("attention_layer_norm", False, "false (no QK norm)"),
    ("rope", True, "true (rotary position embedding)"),
    ("alibi", False, "false"),
    ("weight_tying", False, "false (untied LM head)"),
    ("scale_logits", False, "false"),
    ("input_emb_norm", False, "false (no embedding scale)"),
    ("block_group_size", 1, "1"),
)
# Fields that must be absent or null: they change the math and the model has no equivalent.
_MUST_BE_NULL = ("rope_scaling", "clip_qkv")

# config.json of LLaDA-8B; architecture fields are overwritten from the ModelConfig on export.
_LLADA_CONFIG_TEMPLATE = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                 "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
    "mlp_hidden_size": 12288, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
    "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "use_cache": False, "vocab_size": 126464,
    "weight_tying": False,
}


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
  path = pathlib.Path(hf_dir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: not found; expected the config.json of a Hugging Face LLaDA checkpoint")
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f"{path}: not valid JSON ({decode_error(e)})") from None
  if not isinstance(config, dict):
    raise ConversionError(f"{path}: expected a JSON object")
  return config


class _Fields:
  """The fields of a config.json, read with the reference defaults; a bad one is reported by name."""

  def __init__(self, hf_config: Mapping[str, Any], where: str):
    self.config, self.where = hf_config, where

  def get(self, field: str):
    return self.config.get(field, _REFERENCE_DEFAULTS.get(field))

  def fail(self, field: str, supported: str) -> NoReturn:
    shown = (json.dumps(self.config[field]) if field in self.config
             else f"absent (reference default {json.dumps(self.get(field))})")
    raise ConversionError(f"{self.where}: field '{field}' is {shown}; llada_jax supports {supported}")

  def positive_int(self, field: str, value=None) -> int:
    value = self.get(field) if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      if field not in self.config:
        raise ConversionError(f"{self.where}: field '{field}' is missing; expected a positive integer")
      self.fail(field, "a positive integer")
    return value


def _check_supported(f: _Fields) -> None:
  """Refuses what the llada_jax model cannot reproduce: another model type, biases, LayerNorm, ..."""
  if "model_type" in f.config and f.config["model_type"] != "llada":
    f.fail("model_type", '"llada"')
  for field, accepted, supported in _SUPPORTED:
    value = f.get(field)
    if field == "bias_for_layer_norm" and value is None:
      continue  # null: follows include_bias, checked above
    if value is None and accepted is False:
      continue
    if value != accepted or type(value) is not type(accepted):
      f.fail(field, supported)
  for field in _MUST_BE_NULL:
    if f.config.get(field) is not None:
      f.fail(field, "null (absent)")


def _sizes(f: _Fields) -> dict[str, int]:
  """Width, depth, heads, MLP width and embedding rows as ModelConfig fields, checked against each other."""
  d, n_heads, n_layers = f.positive_int("d_model"), f.positive_int("n_heads"), f.positive_int("n_layers")
  if d % n_heads:
    f.fail("n_heads", f"a divisor of d_model={d}")
  if "head_dim" in f.config and f.config["head_dim"] not in (None, d // n_heads):
    f.fail("head_dim", f"null or d_model / n_heads = {d // n_heads}")

  multi_query, n_kv = f.get("multi_query_attention"), f.get("n_kv_heads")
  if n_kv is None:
    n_kv = 1 if multi_query else n_heads
  elif multi_query is not None and n_kv != (1 if multi_query else n_heads):
    f.fail("multi_query_attention", f"null, or a value consistent with n_kv_heads={n_kv}")
  n_kv = f.positive_int("n_kv_heads", n_kv)
  if n_heads % n_kv:
    f.fail("n_kv_heads", f"a divisor of n_heads={n_heads}")

  mlp = f.get("mlp_hidden_size")
  mlp = f.positive_int("mlp_hidden_size", mlp) if mlp is not None else f.positive_int("mlp_ratio") * d
  vocab = f.positive_int("vocab_size")
  embedding = f.get("embedding_size")
  embedding = vocab if embedding is None else f.positive_int("embedding_size", embedding)
  if embedding < vocab:
    f.fail("embedding_size", f"at least vocab_size={vocab} (the embedding rows)")
  return dict(vocab_size=embedding, d_model=d, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
              mlp_hidden_size=mlp)


def _positive_floats(f: _Fields) -> dict[str, float]:
  floats = {}
  for field, name in (("rope_theta", "rope_theta"), ("rms_norm_eps", "norm_eps")):
    value = f.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
      f.fail(field, "a positive number")
    floats[name] = float(value)
  return floats


# Ids the model config may lack: the model never reads BOS, and the reference `save_pretrained`
# writes config.json without it. Mask and EOS are needed (noising, sampling, padding).
_OPTIONAL_IDS = ("bos_token_id",)


def _special_ids(f: _Fields, tokenizer, embedding: int) -> dict[str, int | None]:
  """mask, EOS and BOS ids from config.json or else the tokenizer; where both give one they must agree.
  BOS is None when neither gives it."""
  ids = {}
  for field, tok_attr in (("mask_token_id", "mask_id"), ("eos_token_id", "eos_id"), ("bos_token_id", "bos_id")):
    from_config = f.config.get(field)
    from_tok = getattr(tokenizer, tok_attr) if tokenizer is not None else None
    if from_config is not None and (isinstance(from_config, bool) or not isinstance(from_config, int)):
      f.fail(field, "an integer token id")
    if from_config is not None and from_tok is not None and from_config != from_tok:
      raise ConversionError(f"{f.where}: field '{field}' is {from_config} but the tokenizer {tokenizer.path} "
                            f"gives {from_tok}; expected them to agree")
    value = from_config if from_config is not None else from_tok
    if value is None and field in _OPTIONAL_IDS:
      ids[field] = None
      continue
    if value is None:
      raise ConversionError(f"{f.where}: field '{field}' is missing and no tokenizer.json gives it; add it to "
                            "config.json or pass --tokenizer")
    if not 0 <= value < embedding:
      f.fail(field, f"an id below the embedding size {embedding}")
    ids[field] = value
  return ids


def model_config_from_hf(hf_config: Mapping[str, Any], *, where: str = CONFIG_FILE, tokenizer=None,
                         param_dtype: str = "float32", scan_layers: bool = False) -> model_lib.ModelConfig:
  """The llada_jax ModelConfig of a Hugging Face LLaDA config.json (checked field by field).

  Special ids come from config.json (`mask_token_id`, `eos_token_id`, `bos_token_id`) or else from
  `tokenizer`; where both give one they must agree. Without either, bos_token_id is None.
  """
  fields = _Fields(hf_config, where)
  _check_supported(fields)
  sizes = _sizes(fields)
  floats = _positive_floats(fields)
  ids = _special_ids(fields, tokenizer, sizes["vocab_size"])
  if param_dtype not in PARAM_DTYPES:
    raise ValueError(f"param_dtype={param_dtype!r}: expected one of {PARAM_DTYPES}")
  return model_lib.ModelConfig(**sizes, **floats, **ids, param_dtype=param_dtype, scan_layers=scan_layers)


def hf_config_from_model(cfg: model_lib.ModelConfig, *, torch_dtype: str,
                         base: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """config.json for the reference modeling_llada.py.

  `base` (the config.json an imported checkpoint came with) keeps fields llada_jax does not model,
  such as max_sequence_length or a vocab_size below the embedding size; architecture fields always
  come from `cfg`.
  """
  if cfg.resolved_head_dim * cfg.n_heads != cfg.d_model:
    raise ConversionError(f"model.head_dim={cfg.head_dim}: the reference modeling_llada.py needs "
                          f"n_heads * head_dim = d_model ({cfg.n_heads} * {cfg.resolved_head_dim} != {cfg.d_model})")
  out = {**_LLADA_CONFIG_TEMPLATE, **dict(base or {})}
  for field, accepted, _ in _SUPPORTED:
    out[field] = accepted
  vocab = out.get("vocab_size")
  out.update(
      model_type="llada", d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.kv_heads,
      multi_query_attention=None, n_layers=cfg.n_layers, mlp_hidden_size=cfg.mlp_hidden_size,
      embedding_size=cfg.vocab_size,
      vocab_size=vocab if base is not None and isinstance(vocab, int) and vocab <= cfg.vocab_size else cfg.vocab_size,
      rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, mask_token_id=cfg.mask_token_id,
      eos_token_id=cfg.eos_token_id, bos_token_id=cfg.bos_token_id, torch_dtype=torch_dtype)
  if cfg.bos_token_id is None:  # unknown: left out, as the reference save_pretrained does
    out.pop("bos_token_id")
  if base is None or out.get("pad_token_id") is None:
    out["pad_token_id"] = cfg.eos_token_id  # LLaDA pads with EOS
  for field in _MUST_BE_NULL:
    out.pop(field, None)
  return dict(sorted(out.items()))

