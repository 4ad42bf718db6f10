"""The demo's persistent compilation cache: programs land in the chosen directory, a second process
reads them back instead of compiling, and a directory the user chose wins. Each case runs in its own
process, because JAX decides once per process whether to use a cache."""

import os
import subprocess
import sys

import pytest

PROGRAM = """
import sys, jax, jax.numpy as jnp
from llada_jax import compilation_cache
print("enabled" if compilation_cache.enable(sys.argv[1]) else "kept", jax.config.jax_compilation_cache_dir)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
print(float(f(jnp.ones((8, 8)))))
"""


def _run(path, env_dir=None):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  if env_dir is not None:  # the user's own cache, keeping every program
    env["JAX_COMPILATION_CACHE_DIR"] = str(env_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  out = subprocess.run([sys.executable, "-c", PROGRAM, str(path)], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines()


def _entries(path):
  return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_programs_are_cached_and_read_back(tmp_path):
  cache = tmp_path / "workdir" / "jax_cache"
  first = _run(cache)
  assert first[0] == f"enabled {cache}"
  entries = _entries(cache)
  assert any(name.startswith("jit__lambda") for name in entries), entries
  mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
  second = _run(cache)
  assert second == first  # same result from the cached program
  assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes  # nothing compiled anew


def test_a_cache_the_user_chose_wins(tmp_path):
  ours, theirs = tmp_path / "ours", tmp_path / "theirs"
  out = _run(ours, env_dir=theirs)
  assert out[0] == f"kept {theirs}"
  assert not ours.exists() and _entries(theirs)


@pytest.mark.parametrize("bad", ["jax_cache_is_a_file"])
def test_an_unusable_cache_directory_does_not_stop_the_program(tmp_path, bad):
  path = tmp_path / bad
  path.write_text("not a directory")
  assert _run(path)[1] == "64.0"  # JAX warns and compiles without the cache
