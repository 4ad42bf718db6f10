"""The demo chain's progress display: stage, step and the time left for the whole chain."""

import pytest

from llada_jax.recipes import demo, progress as progress_lib
from llada_jax.recipes.progress import ChainProgress, Stage


class Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def make(stages, every_s=0.0):
  clock, lines = Clock(), []
  return ChainProgress(stages, emit=lines.append, clock=clock, every_s=every_s), clock, lines


STAGES = [Stage("train", 100, "step", 1.0), Stage("eval", 10, "problem", 2.0)]


def test_before_any_work_the_priors_are_the_estimate():
  p, _, _ = make(STAGES)
  assert p.speed_factor() == pytest.approx(1.0)
  assert p.seconds_left() == 100 * 1.0 + 10 * 2.0


PSEUDO = progress_lib.PSEUDO_SECONDS


def test_a_slower_host_scales_the_stages_still_to_come():
  p, clock, lines = make(STAGES)
  p.update("train", 0)  # a fresh run reports step 0 first
  clock.t = 30.0
  p.update("train", 10)  # 10 steps in 30 s (with compilation): 3x the prior
  factor = (30 + PSEUDO) / (10 + PSEUDO)  # shrunk towards 1 while little is measured
  assert p.speed_factor() == pytest.approx(factor)
  # No rate of its own yet (the first interval holds compilation): the factor for both stages.
  assert p.seconds_left() == pytest.approx((90 * 1.0 + 10 * 2.0) * factor)
  clock.t = 50.0
  p.update("train", 20)  # then 2 s/step: the current stage's own rate; later stages keep the factor
  factor = (50 + PSEUDO) / (20 + PSEUDO)
  assert p.speed_factor() == pytest.approx(factor)
  assert p.seconds_left() == pytest.approx(80 * 2.0 + 10 * 2.0 * factor)
  assert lines[-1] == "[1/2 train] step 20/100; 50s elapsed, about 3m12s left in all"
  clock.t = 5050.0
  p.update("train", 100)  # with much measured, the factor is the measured ratio
  assert p.speed_factor() == pytest.approx(5050 / 100, rel=0.3)


def test_units_found_done_cost_no_time_and_leave_the_factor_alone():
  p, clock, _ = make(STAGES)
  clock.t = 5.0
  p.update("train", 60)  # a resumed run's first report: 60 steps were on disk
  assert p.speed_factor() == pytest.approx(1.0)
  assert p.seconds_left() == pytest.approx(40 * 1.0 + 20.0)
  clock.t = 25.0
  p.update("train", 70)  # 10 steps in 20 s
  assert p.speed_factor() == pytest.approx((20 + PSEUDO) / (10 + PSEUDO))
  p.skip("eval")  # found complete: nothing left there
  assert p.seconds_left() == pytest.approx(30 * p.speed_factor())


def test_end_completes_a_stage_and_unknown_or_repeated_names_are_refused():
  p, clock, lines = make(STAGES)
  p.begin("eval")
  clock.t = 4.0
  p.end("eval")  # a stage that reports no units: all of them in the one interval
  assert p.speed_factor() == pytest.approx((4 + PSEUDO) / (20 + PSEUDO))
  assert p.seconds_left() == pytest.approx(100 * p.speed_factor())
  assert lines[-1] == "[2/2 eval] problem 10/10; 4s elapsed, about 1m08s left in all"
  with pytest.raises(KeyError, match="unknown stage 'sft'"):
    p.update("sft", 1)
  with pytest.raises(ValueError, match="repeat"):
    ChainProgress(STAGES + STAGES[:1], emit=print)


def test_lines_are_rate_limited_except_at_stage_boundaries():
  p, clock, lines = make(STAGES, every_s=10.0)
  p.begin("train")
  for step in range(1, 20):
    clock.t = float(step)
    p.update("train", step)
  assert len(lines) == 2  # the start, then 10 s later
  p.end("train")
  assert len(lines) == 3


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.4, "59s"), (61, "1m01s"), (3599, "59m59s"),
                                           (3600, "1h00m"), (7322, "2h02m"), (-3, "0s")])
def test_format_duration(seconds, text):
  assert progress_lib.format_duration(seconds) == text


def test_the_demo_plan_lists_every_stage_in_run_order_with_its_size():
  stages = demo.plan(demo.FULL)
  names = [s.name for s in stages]
  assert names[:5] == ["data", "pretrain", "sft", "pairs", "eval_sft"]
  assert names[5:9] == ["vrpo_seed0", "eval_vrpo_seed0", "naive_dpo_seed0", "eval_naive_dpo_seed0"]
  assert names[-1] == "table2" and len(names) == 5 + 4 * len(demo.FULL.seeds) + 1
  sizes = {s.name: s.units for s in stages}
  assert sizes["pretrain"] == 600 and sizes["sft"] == 1800 and sizes["vrpo_seed2"] == 16
  assert sizes["pairs"] == 768 * 8 and sizes["eval_sft"] == 1000 and sizes["table2"] == 6
  smoke = {s.name: s.units for s in demo.plan(demo.SMOKE)}
  assert smoke["sft"] == demo.SMOKE.sft_steps and smoke["eval_sft"] == demo.SMOKE.n_test
