"""Seeds and baselines (enas_jax/seeds.py): K seeds of the search and of random
search, the report (seeds.json, seeds.md), skipping finished runs, a failing
seed reported while the others complete, the command line's refusals."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_ptb_config
from enas_jax import seeds


def _cfg(**kw):
  return tiny_ptb_config(**{"search.then_final": False, "search.num_epochs": 1, **kw})


def _arcs(run_dir):
  with open(os.path.join(run_dir, "arcs.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_seeds_two_samplers_report_rerun_and_failure(tmp_path):
  work = str(tmp_path / "seeds")
  calls, logs = [], []

  def crashing(cfg, d, seed, sampler):
    calls.append((sampler, seed))
    assert cfg.seed == seed and cfg.search.sampler == sampler
    if (sampler, seed) == ("uniform", 1):
      raise RuntimeError("simulated crash of this seed")
    seeds.in_process_runner(cfg, d, seed, sampler)

  rep = seeds.run_seeds(_cfg(), 2, baseline=True, workdir=work, runner=crashing,
                        log=logs.append)
  assert calls == [("controller", 0), ("uniform", 0), ("controller", 1), ("uniform", 1)]  # seed-major
  status = {(r["sampler"], r["seed"]): r["status"] for r in rep["runs"]}
  assert status == {("controller", 0): "done", ("controller", 1): "done",
                    ("uniform", 0): "done", ("uniform", 1): "failed"}
  failed = rep["runs"][3]
  assert "simulated crash" in failed["error"]
  assert any("uniform seed 1: FAILED" in line and "simulated crash" in line for line in logs)
  assert any("1 of 4 runs failed: uniform seed 1" in line for line in logs)

  # Every run used its own seed and sampler, in its own directory.
  for r in rep["runs"][:3]:
    with open(os.path.join(r["workdir"], "config.json")) as f:
      c = json.load(f)
    assert (c["seed"], c["search"]["sampler"]) == (r["seed"], r["sampler"])
    rows = _arcs(r["workdir"])
    assert r["best_valid_ppl"] == rows[0]["valid_ppl"]
    assert r["median_valid_ppl"] == pytest.approx(
        statistics.median(x["valid_ppl"] for x in rows))
    assert r["best_arc"] == rows[0]["arc"]
  # Different seeds: different searches.
  assert rep["runs"][0]["best_valid_ppl"] != rep["runs"][1]["best_valid_ppl"]

  # seeds.json holds the same as the return value; the means match the per-seed values.
  with open(os.path.join(work, "seeds.json")) as f:
    js = json.load(f)
  assert js["metric"] == "ppl" and js["higher_is_better"] is False
  assert [r["status"] for r in js["runs"]] == ["done", "done", "done", "failed"]
  ctrl = js["summary"]["controller"]["best_valid_ppl"]
  vals = [rep["runs"][0]["best_valid_ppl"], rep["runs"][1]["best_valid_ppl"]]
  assert ctrl["values"] == vals and ctrl["seeds"] == [0, 1] and ctrl["n"] == 2
  assert ctrl["mean"] == pytest.approx(sum(vals) / 2)
  assert ctrl["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)  # ddof=1
  uni = js["summary"]["uniform"]["best_valid_ppl"]
  assert uni["n"] == 1 and uni["std"] == 0.0 and uni["seeds"] == [0]  # failed seed left out
  assert "final_test_ppl" not in js["summary"]["controller"]  # then_final was off
  assert js["comparison"]["primary"] == "best_valid_ppl"
  assert js["comparison"]["exceeds_combined_std"] is None  # one finished uniform seed

  md = open(os.path.join(work, "seeds.md")).read()
  assert md == rep["table"]
  f = seeds._fmt
  assert f"| controller | 2 | {f(ctrl['mean'])} ± {f(ctrl['std'])} |" in md
  assert f"| uniform | 1 | {f(uni['mean'])} ± 0 |" in md
  assert f"| controller | 1 | done | {f(vals[1])} |" in md
  assert "| uniform | 1 | failed | – |" in md
  assert "- uniform seed 1: RuntimeError: simulated crash of this seed" in md
  better = "controller (ENAS)" if ctrl["mean"] < uni["mean"] else "uniform (random search)"
  assert f"{better} did better" in md

  # Rerun: finished runs are skipped, the failed one runs.
  calls2 = []

  def recording(cfg, d, seed, sampler):
    calls2.append((sampler, seed))
    seeds.in_process_runner(cfg, d, seed, sampler)

  rep2 = seeds.run_seeds(_cfg(), 2, baseline=True, workdir=work, runner=recording,
                         log=lambda s: None)
  assert calls2 == [("uniform", 1)]
  assert [r["status"] for r in rep2["runs"]] == ["skipped", "skipped", "skipped", "done"]
  assert [r["best_valid_ppl"] for r in rep2["runs"][:3]] == [
      r["best_valid_ppl"] for r in rep["runs"][:3]]
  s2 = rep2["summary"]
  for sampler in ("controller", "uniform"):
    v = [r["best_valid_ppl"] for r in rep2["runs"] if r["sampler"] == sampler]
    assert s2[sampler]["best_valid_ppl"]["values"] == v
    assert s2[sampler]["best_valid_ppl"]["mean"] == pytest.approx(statistics.fmean(v))
    assert s2[sampler]["best_valid_ppl"]["std"] == pytest.approx(statistics.stdev(v))
    m = [r["median_valid_ppl"] for r in rep2["runs"] if r["sampler"] == sampler]
    assert s2[sampler]["median_valid_ppl"]["mean"] == pytest.approx(statistics.fmean(m))
  cmp = rep2["comparison"]
  sa, sb = s2["controller"]["best_valid_ppl"], s2["uniform"]["best_valid_ppl"]
  assert cmp["difference"] == pytest.approx(abs(sa["mean"] - sb["mean"]))
  assert cmp["combined_std"] == pytest.approx((sa["std"] ** 2 + sb["std"] ** 2) ** 0.5)
  assert cmp["exceeds_combined_std"] == (cmp["difference"] > cmp["combined_std"])
  assert cmp["better"] == ("controller" if sa["mean"] < sb["mean"] else "uniform")

  # What counts as finished: logging-only changes keep a run finished, a longer
  # search or another config does not (the run would resume or be refused).
  rdir = seeds.run_dir(work, "controller", 0)
  same = seeds.seed_config(_cfg(**{"log_every": 7, "derive.batch": 3}), 0, "controller")
  assert seeds.is_finished(same, rdir)
  assert not seeds.is_finished(seeds.seed_config(_cfg(**{"search.num_epochs": 2}), 0,
                                                 "controller"), rdir)
  assert not seeds.is_finished(seeds.seed_config(_cfg(), 1, "controller"), rdir)
  assert not seeds.is_finished(seeds.seed_config(_cfg(**{"search.then_final": True}), 0,
                                                 "controller"), rdir)


def _summary(a, b):
  def entry(values):
    mean, std = seeds.mean_std(values)
    return {"n": len(values), "mean": mean, "std": std}
  return {s: {"final_test_acc": entry(v), "best_valid_acc": entry([0.0])}
          for s, v in (("controller", a), ("uniform", b))}


def test_compare_direction_and_noise():
  # Accuracy: higher is better; the final test metric is primary when present.
  c = seeds.compare(_summary([0.90, 0.92], [0.80, 0.81]), "acc", seeds.SAMPLERS)
  assert c["primary"] == "final_test_acc" and c["better"] == "controller"
  assert c["exceeds_combined_std"] is True and "exceeds the combined std" in c["verdict"]
  c = seeds.compare(_summary([0.80, 0.90], [0.84, 0.83]), "acc", seeds.SAMPLERS)
  assert c["better"] == "controller" and c["exceeds_combined_std"] is False
  assert "does not exceed" in c["verdict"]
  c = seeds.compare(_summary([0.7, 0.71], [0.8, 0.81]), "acc", seeds.SAMPLERS)
  assert c["better"] == "uniform"
  assert "No baseline" in seeds.compare(_summary([1.0], [1.0]), "acc", ("controller",))["verdict"]
  assert seeds.mean_std([3.0]) == (3.0, 0.0)
  m, s = seeds.mean_std([1.0, 2.0, 6.0])
  assert m == 3.0 and s == pytest.approx(statistics.stdev([1.0, 2.0, 6.0]))


def test_bad_input_is_refused():
  with pytest.raises(seeds.BadInput, match="num_seeds"):
    seeds.run_seeds(_cfg(), 0, runner=lambda *a: None)
  with pytest.raises(seeds.BadInput, match="mode"):
    seeds.run_seeds(tiny_ptb_config("final", arc="0 0 1 1 2 0 3"), 1, runner=lambda *a: None)


def test_config_overrides_are_forwarded_unchanged():
  argv = ["--config=configs/ptb.py", "--num_seeds=2", "--config.child.lr=3",
          "--baseline=false", "--noconfig.tensorboard", "--workdir", "x",
          "--config.data.source=synthetic"]
  out = seeds.config_overrides(argv)
  assert out == ["--config.child.lr=3", "--noconfig.tensorboard",
                 "--config.data.source=synthetic"]
  assert seeds.override_names(out) == ["child.lr", "tensorboard", "data.source"]
  cmd = seeds.SubprocessRunner("configs/ptb.py:smoke", out).command("d/uniform_seed3", 3,
                                                                    "uniform")
  assert cmd[1:] == ["-m", "enas_jax.main", "--config=configs/ptb.py:smoke",
                     "--workdir=d/uniform_seed3", *out, "--config.seed=3",
                     "--config.search.sampler=uniform"]


def test_subprocess_runner_reports_the_childs_error(tmp_path):
  # A child that fails fast (bad input, exit code 2): its error line is reported.
  runner = seeds.SubprocessRunner("configs/ptb.py:smoke", ["--config.space.name=nosuch"],
                                  cwd=ROOT, env={"JAX_PLATFORMS": "cpu"})
  rep = seeds.run_seeds(_cfg(), 1, baseline=False, workdir=str(tmp_path), runner=runner,
                        log=lambda s: None)
  (row,) = rep["runs"]
  assert row["status"] == "failed"
  assert "exit code 2 (bad input)" in row["error"]
  assert "unknown search space 'nosuch'" in row["error"]
  assert os.path.exists(str(tmp_path / "controller_seed0.log"))


def _seeds_cli(*args):
  return subprocess.run([sys.executable, "-m", "enas_jax.seeds", *args], cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--num_seeds=0"], "--num_seeds must be an integer >= 1, got 0"),
    ([], "--num_seeds is required"),
    (["--num_seeds=2", "--config.seed=4"], "drop --config.seed"),
    (["--num_seeds=2", "--config.child.hidden_sise=4"], "hidden_sise"),
    (["--num_seeds=2", "--config.child.hidden_size=big"], "config.child.hidden_size"),
])
def test_cli_bad_input_exits_2(tmp_path, args, message):
  r = _seeds_cli("--config=configs/ptb.py:smoke", f"--workdir={tmp_path}", *args)
  assert r.returncode == 2, r.stderr
  assert message in r.stderr and "Traceback" not in r.stderr
  assert not os.listdir(tmp_path)  # nothing was run


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, request):
  """One seed per sampler through the command line (subprocesses), then a rerun."""
  if "slow" not in (request.config.option.markexpr or ""):
    pytest.skip("slow (about 2 minutes): run with -m slow")
  tiny = ["--config.data.vocab_size=40", "--config.data.num_train_tokens=2400",
          "--config.data.num_valid_tokens=800", "--config.data.num_test_tokens=200",
          "--config.data.batch_size=4", "--config.data.eval_batch_size=4",
          "--config.data.bptt=6", "--config.space.num_nodes=4", "--config.child.hidden_size=8",
          "--config.controller.lstm_size=8", "--config.controller.train_steps=2",
          "--config.controller.num_aggregate=2", "--config.search.num_epochs=1",
          "--config.derive.num_samples=3", "--config.derive.valid_batches=3",
          "--config.final.num_epochs=1", "--config.final.valid_batches=4",
          "--config.final.test_batch_size=2", "--config.final.test_bptt=5",
          "--config.tensorboard=False"]
  r = _seeds_cli("--config=configs/ptb.py:smoke", "--num_seeds=1", f"--workdir={tmp_path}",
                 *tiny)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  js = json.loads((tmp_path / "seeds.json").read_text())
  assert [x["status"] for x in js["runs"]] == ["done", "done"]
  assert all("final_test_ppl" in x for x in js["runs"])
  assert js["comparison"]["primary"] == "final_test_ppl"
  assert "did better" in r.stdout or "a tie" in r.stdout
  r = _seeds_cli("--config=configs/ptb.py:smoke", "--num_seeds=1", f"--workdir={tmp_path}",
                 *tiny)
  assert r.returncode == 0 and r.stdout.count("finished earlier, skipped") == 2
