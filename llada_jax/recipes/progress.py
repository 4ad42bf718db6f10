"""Progress of a chain of stages: the stage, how far it is, and the time left for the whole chain.

Each stage has a size in units (training steps, problems, samples, settings) and a prior cost per
unit, in seconds on a reference host. Work measured on this host gives a speed factor (measured
seconds over prior seconds of the units done here), which scales the priors of the stages still to
come; the current stage uses its own rate once it has one. Units found done on disk (a resumed
chain) cost no time and do not enter the factor. tqdm's bars track one loop at one rate, not a chain
of stages of different unit costs, so the estimate is computed here and shown as a log line.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence


PSEUDO_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  units: int
  unit: str  # what one unit is, for the display: "step", "problem", ...
  prior_seconds_per_unit: float  # on the reference host; only ratios between stages matter


@dataclasses.dataclass
class _Done:
  units: float = 0.0  # done in this process, timed
  resumed: float = 0.0  # found done: free
  seconds: float = 0.0  # wall time of the timed units
  finished: bool = False


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ChainProgress:
  """Tracks a chain's stages; `emit(line)` gets a status line at each stage start and end and at
  most every `every_s` seconds in between."""

  def __init__(self, stages: Sequence[Stage], *, emit: Callable[[str], None], clock: Callable[[], float] = time.monotonic,
               every_s: float = 15.0):
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
      raise ValueError(f"ChainProgress: stage names repeat in {names}")
    self.stages = {s.name: s for s in stages}
    self.order = names
    self.done = {name: _Done() for name in names}
    self.emit, self.clock, self.every_s = emit, clock, every_s
    self.t0 = clock()
    self.current: str | None = None
    self._mark = (0.0, 0.0)  # (clock, units) of the current stage's last update
    self._stage_rate: tuple[float, float] | None = None  # (clock, units) from which the stage's rate is taken
    self._last_emit = -float("inf")

  def begin(self, name: str, done: float = 0.0) -> None:
    """Stage `name` starts (or resumes) with `done` units already complete on disk."""
    self._check(name)
    d = self.done[name]
    d.resumed = max(d.resumed, float(done) - d.units)
    self.current = name
    self._mark = (self.clock(), d.units + d.resumed)
    self._stage_rate = None
    self._show(force=True)

  def update(self, name: str, done: float) -> None:
    """`done` units of stage `name` are complete (counting resumed ones). The first report of a
    stage that has not begun begins it, with those units found complete (a resumed training run's
    first step)."""
    self._check(name)
    if name != self.current:
      self.begin(name, done)
      return
    d, now = self.done[name], self.clock()
    t_mark, u_mark = self._mark
    gained = float(done) - u_mark
    if gained > 0:
      d.units += gained
      d.seconds += now - t_mark
      self._mark = (now, float(done))
      # The first update's interval holds the compilation; the stage's own rate starts after it.
      if self._stage_rate is None:
        self._stage_rate = (now, float(done))
    self._show()

  def end(self, name: str) -> None:
    """Stage `name` is complete; units it did not report are counted as done in the last interval."""
    if self.done[name].finished:
      return
    self.update(name, self.stages[name].units)
    self.done[name].finished = True
    self._show(force=True)
    self.current = None

  def skip(self, name: str) -> None:
    """Stage `name` was found complete: no time, no effect on the estimate."""
    self._check(name)
    d = self.done[name]
    d.resumed = self.stages[name].units - d.units
    d.finished = True

  def speed_factor(self) -> float:
    """Measured over prior seconds of the units timed so far, shrunk towards 1 by `PSEUDO_SECONDS`
    of prior work: a few seconds of a small stage (writing the data) say little about the host."""
    measured = sum(d.seconds for d in self.done.values())
    prior = sum(d.units * self.stages[n].prior_seconds_per_unit for n, d in self.done.items())
    return (measured + PSEUDO_SECONDS) / (prior + PSEUDO_SECONDS)

  def seconds_left(self) -> float:
    factor = self.speed_factor()
    left = 0.0
    for name in self.order:
      stage, d = self.stages[name], self.done[name]
      if d.finished:
        continue
      remaining = max(0.0, stage.units - d.units - d.resumed)
      left += remaining * self._seconds_per_unit(name, factor)
    return left

  def _seconds_per_unit(self, name: str, factor: float) -> float:
    if name == self.current and self._stage_rate is not None:
      t_rate, u_rate = self._stage_rate
      t_mark, u_mark = self._mark
      if u_mark > u_rate:
        return (t_mark - t_rate) / (u_mark - u_rate)
    return factor * self.stages[name].prior_seconds_per_unit

  def line(self) -> str:
    elapsed = format_duration(self.clock() - self.t0)
    left = format_duration(self.seconds_left())
    if self.current is None:
      return f"[{elapsed} elapsed] about {left} left"
    stage, d = self.stages[self.current], self.done[self.current]
    index = self.order.index(self.current) + 1
    done = int(d.units + d.resumed)
    return (f"[{index}/{len(self.order)} {stage.name}] {stage.unit} {done}/{stage.units}; "
            f"{elapsed} elapsed, about {left} left in all")

  def _show(self, force: bool = False) -> None:
    now = self.clock()
    if force or now - self._last_emit >= self.every_s:
      self._last_emit = now
      self.emit(self.line())

  def _check(self, name: str) -> None:
    if name not in self.stages:
      raise KeyError(f"ChainProgress: unknown stage {name!r}; expected one of {self.order}")
