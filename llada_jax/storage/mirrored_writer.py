"""Metrics for a remote (gs://) workdir: written locally and mirrored up."""

from __future__ import annotations

import os
import time

import jax
from etils import epath

from llada_jax import metrics as metrics_lib, wandb_writer
from llada_jax.storage import remote


class _MirroredMetricWriter(metrics_lib.MetricWriter):
  """A MetricWriter for a remote workdir: writes a local mirror and copies it up every
  `upload_secs` and on close. A resumed run first fetches the metrics it logged before."""

  # Fetched when the local mirror lacks them: the logs a resumed run appends to, and its W&B run id.
  _FETCHED = ("metrics.jsonl", "text.jsonl", wandb_writer.RUN_ID_FILE)

  def __init__(self, workdir: str, upload_secs: float = 60.0, **writer_kwargs):
    self.remote = epath.Path(workdir)
    self.upload_secs = upload_secs
    local = remote.local_cache("metrics", workdir)
    if jax.process_index() == 0:
      os.makedirs(local, exist_ok=True)
      for name in self._FETCHED:
        if not os.path.exists(os.path.join(local, name)) and (self.remote / name).exists():
          with open(os.path.join(local, name), "wb") as f:
            f.write((self.remote / name).read_bytes())
    super().__init__(local, **writer_kwargs)
    self._uploaded = time.monotonic()

  def write_scalars(self, step, scalars):
    super().write_scalars(step, scalars)
    if time.monotonic() - self._uploaded >= self.upload_secs:
      self.upload()

  def upload(self):
    if not self.enabled:
      return
    self.flush()
    for root, _, files in os.walk(self.workdir):
      for name in files:
        src = os.path.join(root, name)
        dst = self.remote / os.path.relpath(src, self.workdir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as f:
          dst.write_bytes(f.read())
    self._uploaded = time.monotonic()

  def close(self):
    super().close()
    self.upload()


def metric_writer(workdir: str, **writer_kwargs) -> metrics_lib.MetricWriter:
  """`writer_kwargs` go to MetricWriter (e.g. `wandb=`)."""
  if remote.is_remote(workdir):
    return _MirroredMetricWriter(workdir, **writer_kwargs)
  return metrics_lib.MetricWriter(workdir, **writer_kwargs)
