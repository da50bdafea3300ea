"""Several seeds of a search and of its random-search baseline, and a table.

Command line::

  python -m enas_jax.seeds --config=configs/ptb.py[:variant] --num_seeds=K \\
      [--baseline=True] [--workdir=DIR] [--config.x=y ...]

runs the search (``search.sampler=controller``) with ``config.seed = 0 .. K-1``
and, with ``--baseline`` (default), the random-search baseline
(``search.sampler=uniform``) with the same seeds, each in
``DIR/<sampler>_seed<k>`` (default ``DIR``: ``runs/<name>_<variant>_seeds``).
Every run is a subprocess ``python -m enas_jax.main ...`` with the same
``--config.*`` overrides, its output in ``DIR/<sampler>_seed<k>.log``; a run
that fails is reported with its seed and the others go on. Rerunning the
command skips finished runs (derive's ``best_arc.txt``, plus
``final/final_result.json`` when ``search.then_final``) and resumes unfinished
ones from their checkpoints.

At the end it reads each run's ``arcs.jsonl`` (the best and the median derived
arc's validation metric) and ``final/final_result.json`` (final valid/test
metric), writes ``DIR/seeds.json`` (every run) and ``DIR/seeds.md`` (mean ± sample
std per sampler, and the per-seed values), prints the table and says which
sampler did better on the primary metric (final test metric when every run has
one, else derive's best validation metric) and whether the difference exceeds
the combined std.

Exit codes: 0 all runs finished; 1 some runs failed (the table covers the
others); 2 bad input (e.g. ``--num_seeds=0``, an unknown ``--config.*`` key).

From Python (a notebook, the tests): :func:`run_seeds` with a ``runner``, e.g.
:func:`in_process_runner`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

SAMPLERS = ("controller", "uniform")
SAMPLER_NAMES = {"controller": "controller (ENAS)", "uniform": "uniform (random search)"}
# Config fields that seeds.py sets per run; the user may not override them.
PER_RUN_FIELDS = ("seed", "search.sampler")
# Exit codes of enas_jax.main and what they mean.
EXIT_MEANINGS = {1: "error", 2: "bad input", 3: "NaN/Inf or checkpoint failure"}


class SeedRunError(RuntimeError):
  """One seed's run failed (raised by a runner, recorded by :func:`run_seeds`)."""


class BadInput(ValueError):
  """The command line or the config cannot be run (exit code 2)."""


# ----------------------------------------------------------------------------
# Runners: (config, workdir, seed, sampler) -> None, raising on failure.


def in_process_runner(config, workdir: str, seed: int, sampler: str) -> None:
  """Runs ``config`` (seed and sampler already set) in this process."""
  del seed, sampler
  from enas_jax.train import run as run_lib  # heavy import
  run_lib.run(config, workdir)


@dataclasses.dataclass
class SubprocessRunner:
  """Runs each seed as ``python -m enas_jax.main`` (a crash stays in its process).

  Attributes:
    config_arg: the ``--config`` value, e.g. ``configs/ptb.py:smoke``.
    overrides: ``--config.*`` arguments passed through unchanged.
    python: the interpreter.
    cwd: working directory of the child (default: this process's).
    env: extra environment variables for the child.
    echo: also copy the child's output to this process's stdout.
  """

  config_arg: str
  overrides: Sequence[str] = ()
  python: str = sys.executable
  cwd: str | None = None
  env: dict | None = None
  echo: bool = False

  def command(self, workdir: str, seed: int, sampler: str) -> list[str]:
    return [self.python, "-m", "enas_jax.main", f"--config={self.config_arg}",
            f"--workdir={workdir}", *self.overrides, f"--config.seed={int(seed)}",
            f"--config.search.sampler={sampler}"]

  @staticmethod
  def log_path(workdir: str) -> str:
    """Where the child's output goes: ``<run dir>.log``, next to the run directory."""
    return workdir.rstrip("/") + ".log"

  def __call__(self, config, workdir: str, seed: int, sampler: str) -> None:
    del config  # the child builds the same config from the same arguments
    cmd = self.command(workdir, seed, sampler)
    log_path = self.log_path(workdir)
    env = dict(os.environ, **(self.env or {}))
    with open(log_path, "a") as log:
      log.write(f"\n$ {' '.join(cmd)}\n")
      log.flush()
      proc = subprocess.Popen(cmd, cwd=self.cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, bufsize=1)
      tail = []
      for line in proc.stdout:
        log.write(line)
        tail = (tail + [line.rstrip("\n")])[-40:]
        if self.echo:
          sys.stdout.write(line)
          sys.stdout.flush()
      rc = proc.wait()
    if rc != 0:
      raise SeedRunError(f"exit code {rc}{_rc_meaning(rc)}: {_last_error(tail)} "
                         f"(full output: {log_path})")


def _rc_meaning(rc: int) -> str:
  if rc < 0:
    return f" (killed by signal {-rc})"
  return f" ({EXIT_MEANINGS[rc]})" if rc in EXIT_MEANINGS else ""


def _last_error(lines: list[str]) -> str:
  """The child's ``error: ...`` line, else its last non-empty line."""
  for line in reversed(lines):
    if line.startswith("error: "):
      return line[len("error: "):]
  for line in reversed(lines):
    if line.strip():
      return line.strip()
  return "no output"


# ----------------------------------------------------------------------------
# Configs, run directories, results.


def seed_config(config, seed: int, sampler: str):
  """A locked copy of ``config`` with ``seed`` and ``search.sampler`` set."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.seed = int(seed)
    c.search.sampler = sampler
  c.lock()
  return c


def run_dir(workdir: str, sampler: str, seed: int) -> str:
  return os.path.join(workdir, f"{sampler}_seed{int(seed)}")


def default_workdir(config) -> str:
  return os.path.join("runs", f"{config.name}_{config.variant}_seeds")


def check_config(config, num_seeds) -> None:
  """Raises :class:`BadInput` for what cannot be run."""
  if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or num_seeds < 1:
    raise BadInput(f"--num_seeds must be an integer >= 1, got {num_seeds!r}.")
  if config.mode != "search":
    raise BadInput(
        f"seeds runs searches, but config.mode is {config.mode!r}; use a search "
        f"variant (e.g. configs/ptb.py:search) or --config.mode=search.")


def _flatten(d, prefix=""):
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def is_finished(config, rdir: str) -> bool:
  """The run in ``rdir`` derived (and, with ``then_final``, finished final
  training) under the same config, up to fields that change only how it logs."""
  if not os.path.exists(os.path.join(rdir, "best_arc.txt")):
    return False
  if config.search.then_final and not os.path.exists(
      os.path.join(rdir, "final", "final_result.json")):
    return False
  try:
    with open(os.path.join(rdir, "config.json")) as f:
      old = _flatten(json.load(f))
  except (OSError, ValueError):
    return False
  from enas_jax.train.common import RESUMABLE_FIELDS
  # Fields that make a finished run stale when they change (the run resumes).
  lengths = {"search.num_epochs", "final.num_epochs", "search.then_final"}
  cosmetic = set(RESUMABLE_FIELDS) - lengths
  new = _flatten(json.loads(config.to_json()))
  return all(old.get(k) == new.get(k) for k in set(old) | set(new) if k not in cosmetic)


def read_results(rdir: str) -> dict:
  """What a run left: the metric name, derive's best and median validation
  value, the best arc, and final valid/test values when present."""
  out = {}
  path = os.path.join(rdir, "arcs.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    if rows:
      key = next(k for k in rows[0] if k.startswith("valid_"))
      metric = key[len("valid_"):]
      vals = [float(r[key]) for r in rows]
      out.update(metric=metric, best_arc=rows[0]["arc"], num_derived=len(rows))
      out[f"best_valid_{metric}"] = vals[0]  # rows are best first
      out[f"median_valid_{metric}"] = float(statistics.median(vals))
  path = os.path.join(rdir, "final", "final_result.json")
  if os.path.exists(path):
    with open(path) as f:
      final = json.load(f)
    for k, v in final.items():
      m = re.fullmatch(r"(valid|test)_(ppl|acc)", k)
      if m:
        out.setdefault("metric", m.group(2))
        out[f"final_{k}"] = float(v)
  return out


def metric_keys(metric: str) -> list[tuple[str, str]]:
  """(row key, column title) of every reported value, in table order."""
  return [(f"best_valid_{metric}", f"derive best valid {metric}"),
          (f"median_valid_{metric}", f"derive median valid {metric}"),
          (f"final_valid_{metric}", f"final valid {metric}"),
          (f"final_test_{metric}", f"final test {metric}")]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
  values = [float(v) for v in values]
  mean = statistics.fmean(values)
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return mean, std


def summarize(rows: list[dict], metric: str, samplers: Sequence[str]) -> dict:
  """Per sampler and value: n, mean, std, per-seed values (finished runs only)."""
  out = {}
  for s in samplers:
    done = [r for r in rows if r["sampler"] == s and r["status"] in ("done", "skipped")]
    out[s] = {}
    for key, _ in metric_keys(metric):
      have = [r for r in done if r.get(key) is not None]
      if not have:
        continue
      mean, std = mean_std([r[key] for r in have])
      out[s][key] = {"n": len(have), "mean": mean, "std": std,
                     "seeds": [r["seed"] for r in have], "values": [r[key] for r in have]}
  return out


def compare(summary: dict, metric: str, samplers: Sequence[str],
            higher_is_better: bool | None = None) -> dict:
  """Which sampler did better on the primary metric, and by how much.
  ``higher_is_better``: the metric's direction (the space entry's; default:
  higher for ``acc``, lower otherwise)."""
  if len(samplers) < 2:
    return {"verdict": "No baseline runs (--baseline=False): nothing to compare."}
  a, b = samplers[0], samplers[1]
  primary = None
  for key in (f"final_test_{metric}", f"best_valid_{metric}"):
    if key in summary[a] and key in summary[b]:
      primary = key
      break
  if primary is None:
    return {"verdict": "No finished runs of one of the samplers: nothing to compare."}
  title = dict(metric_keys(metric))[primary]
  sa, sb = summary[a][primary], summary[b][primary]
  higher = metric == "acc" if higher_is_better is None else bool(higher_is_better)
  diff = sa["mean"] - sb["mean"]
  combined = math.sqrt(sa["std"] ** 2 + sb["std"] ** 2)
  direction = "higher" if higher else "lower"
  if diff == 0:
    better = None
  else:
    better = a if (diff > 0) == higher else b
  res = {"primary": primary, "better": better, "difference": abs(diff),
         "combined_std": combined, "higher_is_better": higher}
  means = (f"{SAMPLER_NAMES[a]} {_fmt(sa['mean'])} ± {_fmt(sa['std'])} (n={sa['n']}) vs "
           f"{SAMPLER_NAMES[b]} {_fmt(sb['mean'])} ± {_fmt(sb['std'])} (n={sb['n']})")
  if better is None:
    text = f"Primary metric {title} ({direction} is better): a tie, {means}."
    res["exceeds_combined_std"] = False
  else:
    text = (f"Primary metric {title} ({direction} is better): {SAMPLER_NAMES[better]} did "
            f"better, {means}. ")
    if min(sa["n"], sb["n"]) < 2:
      res["exceeds_combined_std"] = None
      text += (f"The difference is {_fmt(abs(diff))}; a sampler with a single finished seed "
               f"has no std to judge it against (run more seeds).")
    else:
      exceeds = abs(diff) > combined
      res["exceeds_combined_std"] = exceeds
      text += (f"The difference {_fmt(abs(diff))} {'exceeds' if exceeds else 'does not exceed'}"
               f" the combined std {_fmt(combined)} (sqrt(std_a² + std_b²))"
               + ("." if exceeds else ": within seed-to-seed noise."))
  res["verdict"] = text
  return res


def _fmt(v) -> str:
  if v is None:
    return "–"
  return f"{v:.4g}"


def format_table(rows: list[dict], summary: dict, comparison: dict, metric: str,
                 samplers: Sequence[str], title: str) -> str:
  """The markdown report: summary table, per-seed table, failures, verdict."""
  keys = [(k, t) for k, t in metric_keys(metric) if any(k in summary[s] for s in samplers)]
  lines = [f"# {title}", ""]
  head = ["sampler", "n"] + [t for _, t in keys]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for s in samplers:
    ns = {summary[s][k]["n"] for k, _ in keys if k in summary[s]}
    cells = [s, str(max(ns) if ns else 0)]
    for k, _ in keys:
      v = summary[s].get(k)
      if v is None:
        cells.append("–")
      else:
        n_note = "" if v["n"] == max(ns) else f" (n={v['n']})"
        cells.append(f"{_fmt(v['mean'])} ± {_fmt(v['std'])}{n_note}")
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Mean ± sample standard deviation (ddof=1) over seeds.", "", "Per seed:", ""]
  head = ["sampler", "seed", "status"] + [t for _, t in keys] + ["best arc"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["sampler"], str(r["seed"]), r["status"]] + [_fmt(r.get(k)) for k, _ in keys]
    cells.append(f"`{r['best_arc']}`" if r.get("best_arc") else "–")
    lines.append("| " + " | ".join(cells) + " |")
  failed = [r for r in rows if r["status"] == "failed"]
  if failed:
    lines += ["", "Failed runs (not in the statistics):", ""]
    lines += [f"- {r['sampler']} seed {r['seed']}: {r['error']}" for r in failed]
  lines += ["", comparison["verdict"], ""]
  return "\n".join(lines)


def run_seeds(config, num_seeds: int, baseline: bool = True, workdir: str | None = None,
              runner: Callable | None = None, log: Callable[[str], None] = print) -> dict:
  """Runs (or skips, when finished) every (sampler, seed) and writes the report.

  Args:
    config: a search config (its ``seed`` and ``search.sampler`` are replaced).
    num_seeds: K; seeds 0 .. K-1.
    baseline: also run the random-search baseline (``search.sampler=uniform``).
    workdir: where runs and reports go (default ``runs/<name>_<variant>_seeds``).
    runner: ``(config, run_dir, seed, sampler) -> None``, raising on failure;
      default :func:`in_process_runner` (the CLI passes a :class:`SubprocessRunner`).
    log: where progress lines go.

  Returns:
    ``{"runs": [...], "summary": {...}, "comparison": {...}, "metric": ...,
    "table": markdown, "json_path": ..., "md_path": ...}``.

  Raises:
    BadInput: ``num_seeds`` < 1 or the config is not a search.
  """
  check_config(config, num_seeds)
  runner = runner or in_process_runner
  workdir = workdir or default_workdir(config)
  samplers = SAMPLERS if baseline else SAMPLERS[:1]
  os.makedirs(workdir, exist_ok=True)
  rows = []
  total = len(samplers) * num_seeds
  # Seed-major order (controller seed 0, uniform seed 0, controller seed 1, ...):
  # a study stopped part-way still has matched pairs to compare.
  for seed in range(num_seeds):
    for s in samplers:
      rdir = run_dir(workdir, s, seed)
      cfg = seed_config(config, seed, s)
      row = {"sampler": s, "seed": seed, "workdir": rdir}
      where = f"[{len(rows) + 1}/{total}] {s} seed {seed}"
      if is_finished(cfg, rdir):
        row["status"] = "skipped"
        log(f"{where}: finished earlier, skipped ({rdir})")
      else:
        out = getattr(runner, "log_path", None)
        log(f"{where}: running in {rdir}" + (f" (output: {out(rdir)})" if out else ""))
        t0 = time.time()
        try:
          runner(cfg, rdir, seed, s)
        except Exception as e:  # pylint: disable=broad-except  (reported, others go on)
          row.update(status="failed", error=f"{type(e).__name__}: {e}")
          log(f"{where}: FAILED after {time.time() - t0:.0f} s: {row['error']}")
        else:
          row["status"] = "done"
          log(f"{where}: done in {time.time() - t0:.0f} s")
        row["seconds"] = round(time.time() - t0, 1)
        if row["status"] == "done" and not is_finished(cfg, rdir):
          row.update(status="failed", error="the run returned but left no best_arc.txt"
                     + (" / final/final_result.json" if cfg.search.then_final else ""))
          log(f"{where}: FAILED: {row['error']}")
      row.update(read_results(rdir))
      rows.append(row)
  rows.sort(key=lambda r: (samplers.index(r["sampler"]), r["seed"]))  # report: per sampler
  from enas_jax import spaces
  entry = spaces.entry(config.space.name)
  metric = next((r["metric"] for r in rows if "metric" in r), entry.metric)
  summary = summarize(rows, metric, samplers)
  comparison = compare(summary, metric, samplers, entry.higher_is_better)
  title = (f"Seeds: {config.name}:{config.variant}, {num_seeds} seed(s) per sampler, "
           f"search.num_epochs={config.search.num_epochs}"
           + (f", final.num_epochs={config.final.num_epochs}" if config.search.then_final else ""))
  table = format_table(rows, summary, comparison, metric, samplers, title)
  report = {"config": f"{config.name}:{config.variant}", "metric": metric,
            "higher_is_better": entry.higher_is_better, "num_seeds": num_seeds,
            "samplers": list(samplers), "runs": rows, "summary": summary,
            "comparison": comparison}
  json_path = os.path.join(workdir, "seeds.json")
  md_path = os.path.join(workdir, "seeds.md")
  _write(json_path, json.dumps(report, indent=2) + "\n")
  _write(md_path, table)
  failed = [r for r in rows if r["status"] == "failed"]
  log("")
  log(table)
  if failed:
    log(f"{len(failed)} of {total} runs failed: "
        + "; ".join(f"{r['sampler']} seed {r['seed']}" for r in failed)
        + ". Rerun the same command to retry them (finished runs are skipped).")
  log(f"wrote {json_path} and {md_path}")
  return dict(report, table=table, json_path=json_path, md_path=md_path)


def _write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------
# Command line.


def config_overrides(argv: Sequence[str], flag_values=None) -> list[str]:
  """The ``--config.*`` arguments of ``argv``, unchanged and in order (with the
  value of a ``--config.x value`` pair whose flag is not boolean)."""
  out = []
  i = 0
  argv = list(argv)
  while i < len(argv):
    arg = argv[i]
    if re.match(r"^-{1,2}(no)?config\.", arg):
      out.append(arg)
      if "=" not in arg and i + 1 < len(argv) and flag_values is not None:
        name = arg.lstrip("-")
        flag = flag_values[name] if name in flag_values else None
        if flag is not None and not flag.boolean:
          out.append(argv[i + 1])
          i += 1
    i += 1
  return out


def override_names(overrides: Sequence[str]) -> list[str]:
  """Config field names of ``--config.x=y`` / ``--noconfig.x`` arguments."""
  names = []
  for arg in overrides:
    m = re.match(r"^-{1,2}(?:no)?config\.([^=]+)", arg)
    if m:
      names.append(m.group(1))
  return names


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file(
      "config", None, "Config file of a search, e.g. configs/ptb.py:search.", lock_config=True)
  num_seeds = flags.DEFINE_integer("num_seeds", None, "Seeds per sampler (0 .. K-1).")
  baseline = flags.DEFINE_boolean(
      "baseline", True, "Also run the random-search baseline (search.sampler=uniform).")
  workdir = flags.DEFINE_string(
      "workdir", None, "Directory of all runs (default runs/<name>_<variant>_seeds).")
  return config, num_seeds, baseline, workdir


def _cli():
  from absl import app, flags
  config_flag, num_seeds_flag, baseline_flag, workdir_flag = _define_flags()

  def main(argv):
    def bad(msg):
      print(f"error: {msg}", file=sys.stderr)
      sys.exit(2)
    if len(argv) > 1:
      bad(f"unexpected arguments: {argv[1:]}")
    config = config_flag.value
    if config is None:
      bad("--config is required, e.g. --config=configs/ptb.py:search")
    if num_seeds_flag.value is None:
      bad("--num_seeds is required, e.g. --num_seeds=5")
    overrides = config_overrides(sys.argv[1:], flags.FLAGS)
    fixed = [n for n in override_names(overrides) if n in PER_RUN_FIELDS]
    if fixed:
      bad(f"seeds sets {', '.join(PER_RUN_FIELDS)} per run itself; drop "
          f"{', '.join('--config.' + n for n in fixed)} (--baseline=False skips the "
          f"uniform runs).")
    try:
      check_config(config, num_seeds_flag.value)
    except BadInput as e:
      bad(str(e))
    runner = SubprocessRunner(flags.FLAGS["config"].config_filename, overrides)
    try:
      report = run_seeds(config, num_seeds_flag.value, baseline=baseline_flag.value,
                         workdir=workdir_flag.value, runner=runner,
                         log=lambda s: print(s, flush=True))
    except BadInput as e:
      bad(str(e))
    if any(r["status"] == "failed" for r in report["runs"]):
      sys.exit(1)

  from enas_jax.cli_util import parse_flags
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  _cli()
