"""lm-evaluation-harness support: the model `llada_jax` (`llada_jax.harness.model`, needs the `eval`
extra: pip install -e .[eval]).

lm-eval 0.4.13 finds models in its own registry only (no entry points), so the model registers when
`llada_jax.harness.model` is imported; `python -m llada_jax.harness` does that and then runs lm-eval's
command line with the same arguments.
"""
