"""Model presets, `models.get_config(NAME)` in a recipe (and `--model=NAME` where a tool takes one).

tiny      tests (a few thousand parameters, runs in milliseconds)
demo      the CPU demo recipe (5.6M parameters with the demo's 1024-piece vocabulary)
llada_1b  a 1.34B model with the LLaDA vocabulary (0.82B without embeddings)
llada_8b  exactly LLaDA-8B (8,015,581,184 parameters)
"""

import dataclasses

import ml_collections

from llada_jax.model import ModelConfig

_LLADA_SPECIAL_IDS = dict(mask_token_id=126336, eos_token_id=126081, bos_token_id=126080)

PRESETS = {
    "tiny": dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=64,
                 rope_theta=10000.0, mask_token_id=31, eos_token_id=1, bos_token_id=2),
    # Special ids of the project's sentencepiece tokenizers (llada_jax.data.tokenizer).
    "demo": dict(vocab_size=2048, d_model=256, n_layers=6, n_heads=4, mlp_hidden_size=768,
                 rope_theta=10000.0, mask_token_id=3, eos_token_id=2, bos_token_id=1),
    "llada_1b": dict(vocab_size=126464, d_model=2048, n_layers=16, n_heads=16, mlp_hidden_size=5632,
                     rope_theta=500000.0, **_LLADA_SPECIAL_IDS),
    "llada_8b": dict(vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                     mlp_hidden_size=12288, rope_theta=500000.0, norm_eps=1e-5, **_LLADA_SPECIAL_IDS),
}


def get_config(name: str = "tiny") -> ml_collections.ConfigDict:
  if name not in PRESETS:
    raise ValueError(f"models: unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
  values = dict(PRESETS[name])
  # Every ModelConfig field is present, so any of them can be overridden from the command line.
  for field in dataclasses.fields(ModelConfig):
    if field.name not in values:
      default = field.default
      values[field.name] = ml_collections.FieldReference(None, field_type=int) if default is None else default
  return ml_collections.ConfigDict(values)
