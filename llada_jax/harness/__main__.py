"""lm-eval's command line with the model `llada_jax` registered:

  python -m llada_jax.harness --model llada_jax --model_args checkpoint=RUN_DIR,mc_num=128,batch_size=16 \\
      --tasks TASK [--apply_chat_template] [--include_path DIR] [--output_path DIR] [--log_samples]

Every argument is lm-eval's (`python -m llada_jax.harness --help`). Without `--include_path` the
tasks shipped in llada_jax/harness/tasks (`llada_demo`: the demo's word problems) are included. A bad
model argument or run directory ends with one line `error: ...` and exit status 1.
"""

from __future__ import annotations

import os
import sys

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


def main() -> int:
  try:
    from lm_eval.__main__ import cli_evaluate  # noqa: PLC0415
  except ImportError:
    print("error: lm-eval is not installed; expected it from the eval extra: pip install -e .[eval]",
          file=sys.stderr)
    return 1
  from llada_jax.harness import model  # noqa: F401, PLC0415 - registers `llada_jax`
  from llada_jax.harness.options import ModelArgsError  # noqa: PLC0415

  if not any(a == "--include_path" or a.startswith("--include_path=") for a in sys.argv[1:]):
    sys.argv += ["--include_path", TASKS_DIR]
  try:
    cli_evaluate()
  except ModelArgsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
