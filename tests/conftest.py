"""Eight fake CPU devices for every test process, so sharding is tested without accelerators.

Set before JAX is imported anywhere; computations that do not ask for a mesh use device 0.
"""

import os
import shutil
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# One persistent compilation cache for the run, shared by the xdist workers and by the subprocesses
# the CLI tests start (they inherit the environment): a program that another test, or the first half
# of a resumed run, already compiled is read back instead of compiled again. Keyed by the program,
# the flags and the JAX version, so a hit is the same executable. Removed when the run ends.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
_CACHE_DIR = os.path.join(tempfile.gettempdir(), "llada_jax_test_compilation_cache", _RUN_ID)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_sessionfinish(session):
  if not hasattr(session.config, "workerinput"):  # the controlling process, after every worker
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)
