"""The README runs as written: its notebook section (on a tiny config) and its
shell examples (parsed from its ```bash blocks)."""

import glob
import os
import re
import shlex
import subprocess
import sys

from conftest import ROOT, tiny_cifar_config, tiny_ptb_config


def _section_code(title: str) -> str:
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  assert blocks, f"no python block under '## {title}'"
  return "\n".join(blocks)


def test_notebook_section_runs(monkeypatch):
  from configs import cifar_macro
  from configs import ptb as ptb_config
  tiny = tiny_ptb_config("smoke")  # built before the patch (it calls get_config)
  monkeypatch.setattr(ptb_config, "get_config", lambda variant="search": tiny)
  tiny_c = tiny_cifar_config("cifar_macro", "smoke")
  monkeypatch.setattr(cifar_macro, "get_config", lambda variant="search": tiny_c)
  ns = {}
  exec(compile(_section_code("Notebook use"), "README.md", "exec"), ns)
  assert float(ns["ppl"]) > 1.0
  assert 0.0 <= float(ns["acc"]) <= 1.0
  assert ns["space"].validate(ns["arc"]) is not None


def test_arc_strings_section_runs():
  code = _section_code("Arc strings")
  # The section shows one call that raises on purpose; run everything else.
  code = "\n".join(l for l in code.splitlines() if "ValueError:" not in l)
  ns = {}
  exec(compile(code, "README.md", "exec"), ns)
  assert ns["c"].num_nodes == 9 and ns["c"].aggregate == "all"


# ---------------------------------------------------------------------------
# The README's shell examples, parsed from its ```bash blocks so that they cannot
# drift from the code. Commands that would train, need data or a network, or
# take minutes are run with --helpshort appended: that still loads the config
# file and variant and parses every flag and --config.* key (a typo exits 2).

# Commands not run at all, and why (matched on their first words).
SKIPPED = {
    ("pip", "install"): "installs packages: needs a network, and changes the environment",
    ("python", "-m", "pytest"): "the test suite itself",
    ("gcloud",): "needs a Cloud TPU slice and credentials",
}
# Commands run with --helpshort instead of for real, and why.
HELP_ONLY = {
    ("python", "-m", "enas_jax.main"): "trains: needs PTB/CIFAR-10 files or minutes (the "
                                       "quickstart: about 35 s; test_pipeline runs it tiny)",
    ("python", "-m", "enas_jax.benchmark"): "times compiled steps: minutes",
    ("python", "-m", "enas_jax.seeds"): "a search per seed and sampler: minutes (test_seeds "
                                        "runs it tiny, in process)",
    ("scripts/",): "each starts a search or final training (seeds.sh: several)",
}
# Run as written (in an empty folder, with the files they read put there).
RUN = {("python", "-m", "enas_jax.visualize"): "draws a diagram: about a second"}


def _shell_commands(text: str) -> list[list[str]]:
  """The commands of the ```bash blocks: continuation lines joined, comments dropped,
  ``a && b`` split, optional ``[...]`` parts of synopses removed."""
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
    pending = ""
    for line in block.replace("\\\n", " ").splitlines():
      pending = f"{pending}\n{line}" if pending else line
      try:
        words = shlex.split(pending, comments=True)
      except ValueError:  # an open quote: the command goes on on the next line
        continue
      pending = ""
      cmd = []
      for w in words + ["&&"]:
        if w != "&&":
          cmd.append(w)
        elif cmd:
          commands.append(cmd)
          cmd = []
    assert not pending, f"unterminated quote in a README bash block: {pending!r}"
  return commands


def _strip_optional(words: list[str]) -> list[str]:
  out, depth = [], 0
  for w in words:
    if depth or w.startswith("["):
      depth += w.count("[") - w.count("]")
      continue
    out.append(re.sub(r"\[[^\]]*\]", "", w))  # configs/ptb.py[:variant] -> configs/ptb.py
  return out


def _kind(words: list[str]):
  for table in (SKIPPED, HELP_ONLY, RUN):
    for prefix in table:
      if tuple(words[:len(prefix)]) == prefix or (
          prefix == ("scripts/",) and words[0].startswith("scripts/")):
        return table
  return None


def _run(words, cwd, timeout=120, **env_extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
             **env_extra)
  if words[0] == "python":
    words = [sys.executable, *words[1:]]
  elif words[0].startswith("scripts/"):
    words = [os.path.join(ROOT, words[0]), *words[1:]]
  return subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


def _readme_commands():
  with open(os.path.join(ROOT, "README.md")) as f:
    return _shell_commands(f.read())


def test_readme_shell_commands_are_all_classified():
  commands = _readme_commands()
  assert len(commands) >= 15, commands  # the parser found the blocks
  unknown = [" ".join(c) for c in commands if _kind(c) is None]
  assert not unknown, (f"README shell commands this test does not know: {unknown}; add "
                       "them to RUN, HELP_ONLY or SKIPPED in tests/test_readme.py")


def test_readme_shell_commands_run(tmp_path):
  ran = 0
  for words in _readme_commands():
    kind, words = _kind(words), _strip_optional(words)
    if kind is HELP_ONLY:
      r = _run(words + ["--helpshort"], ROOT)
      # absl prints the short help and exits 0 or 1; a bad file, variant or key exits 2.
      assert r.returncode in (0, 1) and "--config" in r.stdout and "error" not in r.stderr, (
          words, r.returncode, r.stdout[-2000:], r.stderr[-2000:])
      ran += 1
    elif kind is RUN:
      cwd = tmp_path / f"cmd{ran}"
      (cwd / "runs" / "ptb_search").mkdir(parents=True)  # what a PTB search writes
      (cwd / "runs" / "ptb_search" / "best_arc.txt").write_text(
          "0 0 0 1 1 2 1 2 0 2 0 5 1 1 0 6 1 8 1 8 1 8 1\n")
      r = _run(words, cwd, PYTHONPATH=ROOT)
      out = next(w.split("=", 1)[1] for w in words if w.startswith("--out="))
      # Without Graphviz only the .dot file is written, exit status 1 with a message.
      assert r.returncode == 0 or (r.returncode == 1 and "Graphviz" in r.stderr), r.stderr
      assert (cwd / out).exists() or (cwd / out).with_suffix(".dot").exists(), words
      ran += 1
  assert ran >= 14


def test_every_script_parses_its_flags():
  scripts = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.sh")))
  assert len(scripts) >= 10
  for path in scripts:
    args = ["configs/ptb.py:smoke", "2"] if path.endswith("seeds.sh") else []
    r = _run([f"scripts/{os.path.basename(path)}", *args, "--helpshort"], ROOT)
    assert r.returncode in (0, 1) and "--config" in r.stdout, (path, r.stderr[-2000:])


def test_seeds_script_usage_errors():
  r = _run(["scripts/seeds.sh", "--config=configs/ptb.py", "--num_seeds=5"], ROOT)
  assert r.returncode == 2
  assert "scripts/seeds.sh configs/ptb.py 5 (not --config=" in r.stderr, r.stderr
  for args in ([], ["configs/ptb.py"]):
    r = _run(["scripts/seeds.sh", *args], ROOT)
    assert r.returncode == 2 and "usage: scripts/seeds.sh CONFIG[:VARIANT] NUM_SEEDS" in r.stderr
  r = _run(["scripts/seeds.sh", "--help"], ROOT)
  assert r.returncode == 0 and r.stdout.startswith("usage: scripts/seeds.sh")
