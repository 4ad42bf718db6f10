"""Preemption: a signal (SIGTERM from a TPU maintenance event, a SLURM time limit, a spot VM
reclaim) becomes a step at which every process saves and stops, agreed across processes."""

from __future__ import annotations

import signal
import threading
from typing import Sequence

import jax
import numpy as np
from absl import logging


def _preemption_sync_manager():
  """JAX's preemption sync manager, present after `jax.distributed.initialize` (by default)."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  state = distributed.global_state
  if getattr(state, "client", None) is None:
    return None
  return getattr(state, "preemption_sync_manager", None)


class PreemptionWatcher:
  """Tells the training loop when to save and stop because the job is being preempted.

  Call `should_stop(step)` every step on every process; once it returns True, save with
  `force=True` and exit. It stays True afterwards.

  - One process: a handler for `signals` (SIGTERM by default) sets a flag; `should_stop` returns
    it. The previous handlers come back on `close`.
  - Several processes with JAX's preemption service (the default after
    `jax.distributed.initialize`): JAX already traps SIGTERM and agrees on a step at which every
    process stops; `should_stop` asks it (`multihost_utils.reached_preemption_sync_point`).
    No Python handler is installed, since it would replace JAX's.
  - Several processes without that service: the local flag is combined across processes every
    `check_every` steps (a small host all-gather, so not every step on large jobs).
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM,), *, check_every: int = 1):
    if check_every < 1:
      raise ValueError(f"check_every must be >= 1, got {check_every}.")
    self._signals = tuple(signals)
    self._check_every = check_every
    self._requested = threading.Event()
    self._stopped = False
    self._previous: dict[int, Any] = {}
    self._sync_manager = _preemption_sync_manager() if jax.process_count() > 1 else None
    if self._sync_manager is None:
      if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("PreemptionWatcher must be created in the main thread "
                           "(Python only runs signal handlers there).")
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("Received signal %d: will save a checkpoint and stop.", signum)
    self._requested.set()

  @property
  def requested(self) -> bool:
    """Whether this process received a preemption signal (not agreed across processes)."""
    return self._requested.is_set()

  def should_stop(self, step: int) -> bool:
    if self._stopped:
      return True
    if self._sync_manager is not None:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      self._stopped = bool(multihost_utils.reached_preemption_sync_point(int(step)))
    elif jax.process_count() == 1:
      self._stopped = self._requested.is_set()
    elif int(step) % self._check_every == 0:
      self._stopped = _any_process(self._requested.is_set())
    if self._stopped:
      logging.warning("Preemption: stopping at step %d.", step)
    return self._stopped

  def close(self) -> None:
    for sig, previous in self._previous.items():
      # None means the previous handler was not installed from Python; SIG_DFL is the closest.
      signal.signal(sig, signal.SIG_DFL if previous is None else previous)
    self._previous.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _any_process(flag: bool) -> bool:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.asarray(flag, dtype=np.int32))
  return bool(np.any(flags))
