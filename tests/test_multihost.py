"""Multi-host path: two processes joined by ``jax.distributed`` on localhost (CPU,
gloo collectives), one device each, run search -> derive -> final through the
CLI into one workdir. The result equals one process with two devices: each
process fed only its rows of the data into the global arrays, only process 0
wrote files, and the checkpoints were written collectively."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, xla_flags

FLAGS = [
    "--config=configs/ptb.py:smoke", "--config.data.vocab_size=40",
    "--config.data.num_train_tokens=2400", "--config.data.num_valid_tokens=800",
    "--config.data.num_test_tokens=200", "--config.data.batch_size=4",
    "--config.data.eval_batch_size=4", "--config.data.bptt=6", "--config.space.num_nodes=4",
    "--config.child.hidden_size=8", "--config.controller.lstm_size=8",
    "--config.controller.train_steps=2", "--config.controller.num_aggregate=2",
    "--config.search.num_epochs=1", "--config.search.steps_per_dispatch=40",
    "--config.derive.num_samples=3", "--config.derive.valid_batches=3", "--config.derive.batch=2",
    "--config.final.num_epochs=1", "--config.final.valid_batches=4",
    "--config.final.test_batch_size=2", "--config.final.test_bptt=5", "--config.log_every=20",
    "--config.tensorboard=False",
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = xla_flags()
  env.update(extra)
  return env


def _results(workdir):
  with open(os.path.join(workdir, "final", "final_result.json")) as f:
    final = json.load(f)
  with open(os.path.join(workdir, "best_arc.txt")) as f:
    return f.read().strip(), final["valid_ppl"], final["test_ppl"]


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices(tmp_path):
  multi = str(tmp_path / "multi")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "enas_jax.main", *FLAGS, f"--workdir={multi}"], cwd=ROOT,
      env=_env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
  # Only process 0 reports progress and writes files.
  assert "derive: best of 3 arcs" in outs[0] and "derive:" not in outs[1]

  single = str(tmp_path / "single")
  out = subprocess.run(
      [sys.executable, "-m", "enas_jax.main", *FLAGS, f"--workdir={single}"], cwd=ROOT,
      env=_env(XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2")),
      capture_output=True, text=True, timeout=400, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  arc_m, valid_m, test_m = _results(multi)
  arc_s, valid_s, test_s = _results(single)
  assert arc_m == arc_s
  assert abs(valid_m - valid_s) <= 1e-4 * valid_s and abs(test_m - test_s) <= 1e-4 * test_s
