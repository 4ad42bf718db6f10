"""Weights & Biases output for `metrics.MetricWriter`: the optional `wandb` extra.

`wandb` is imported only when a run asks for it, so runs without it need not install it. The W&B
run id is kept in the workdir (`wandb_run_id`) and the run is opened with `resume="allow"`: running
the same command again continues the same W&B run, and a new workdir starts a new one.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import os
import uuid
from typing import Any, Mapping

# "": W&B's own choice, the WANDB_MODE environment variable or else "online".
MODES = ("", "online", "offline", "disabled")
INSTALL_HINT = "pip install 'llada_jax[wandb]'"
RUN_ID_FILE = "wandb_run_id"


@dataclasses.dataclass(frozen=True)
class WandbSettings:
  project: str = "llada_jax"
  entity: str = ""  # "": the account's default entity
  mode: str = ""  # one of MODES
  run_name: str = ""  # "": the workdir's base name
  tags: tuple[str, ...] = ()


def settings_from_config(logging_config) -> WandbSettings | None:
  """The `config.logging.wandb*` fields; None when W&B output is off."""
  if not logging_config.wandb:
    return None
  return WandbSettings(project=logging_config.wandb_project, entity=logging_config.wandb_entity,
                       mode=logging_config.wandb_mode, run_name=logging_config.wandb_run_name,
                       tags=tuple(logging_config.wandb_tags))


def is_installed() -> bool:
  # find_spec, not an import: validating a config should not pay for importing wandb.
  try:
    return importlib.util.find_spec("wandb") is not None
  except (ImportError, ValueError):
    return False


def _import_wandb():
  try:
    import wandb  # noqa: PLC0415 - optional dependency
  except ImportError as e:
    raise ImportError(f"W&B output needs the wandb package: {INSTALL_HINT}") from e
  return wandb


def run_id(workdir: str) -> str:
  """The workdir's W&B run id, made and saved on first use."""
  path = os.path.join(workdir, RUN_ID_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved = f.read().strip()
    if saved:
      return saved
  new = uuid.uuid4().hex[:16]  # W&B ids: letters, digits, '-' and '_' only
  with open(path, "w", encoding="utf-8") as f:
    f.write(new + "\n")
  return new


class WandbWriter:
  """One W&B run for a workdir; `MetricWriter` calls it on the process that writes."""

  def __init__(self, workdir: str, settings: WandbSettings):
    wandb = _import_wandb()
    self._html = wandb.Html
    name = settings.run_name or os.path.basename(os.path.normpath(os.path.abspath(workdir)))
    self._run = wandb.init(
        project=settings.project or None, entity=settings.entity or None, name=name,
        tags=list(settings.tags) or None, mode=settings.mode or None, id=run_id(workdir), resume="allow",
        # WANDB_DIR, when set, says where W&B keeps its files; else next to the run's other metrics.
        dir=None if os.environ.get("WANDB_DIR") else workdir)

  def write_scalars(self, step: int, values: Mapping[str, int | float]) -> None:
    # W&B drops (with a warning) steps below the last one it logged: after a resume from an earlier
    # checkpoint, the steps that run again show once the run passes its old last step.
    if values:
      self._run.log(dict(values), step=step)

  def write_text(self, step: int, tag: str, text: str) -> None:
    self._run.log({tag: self._html(f"<pre>{html.escape(text)}</pre>", inject=False)}, step=step)

  def write_config(self, config: Mapping[str, Any]) -> None:
    self._run.config.update(dict(config), allow_val_change=True)

  def close(self) -> None:
    if self._run is not None:
      self._run.finish()
      self._run = None
