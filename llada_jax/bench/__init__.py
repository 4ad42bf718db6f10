"""Benchmarks of the framework's hot paths (`python -m llada_jax.bench`; usage in `__main__.py`).

Kept free of imports so that `from llada_jax.bench import timing` loads only the timing helpers: the
sections (`ceiling`, `train_step`, `packing`, `elbo`, `sampling`) register themselves when their
modules are imported, which the command line does.
"""
