"""A persistent XLA compilation cache on disk.

The demo compiles the same programs many times: one VRPO step for every alignment seed, one sampler
for every evaluation, every step again on a resume. With the cache each compiles once per machine
and software stack; JAX keys the entries by the program, the compiler options and the devices, so a
stale entry is never used. Any other command gets the same with `JAX_COMPILATION_CACHE_DIR`.
"""

from __future__ import annotations

import jax


def enable(path) -> bool:
  """Caches compiled programs under `path`, unless a cache directory is already chosen (the
  `JAX_COMPILATION_CACHE_DIR` environment variable, or `jax.config`): the user's choice wins.
  Returns whether `path` is now the cache. Call it before the process's first compilation: JAX
  decides once whether to use a cache. The directory is made at the first compilation."""
  if jax.config.jax_compilation_cache_dir:
    return False
  jax.config.update("jax_compilation_cache_dir", str(path))
  # JAX's default keeps only programs that took over a second to compile; the demo's small steps and
  # samplers take about that, and reading one back costs milliseconds.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return True
