"""Eight fake CPU devices for every test process, so sharding is tested without accelerators.

Set before JAX is imported anywhere; computations that do not ask for a mesh use device 0.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
