"""The README's notebook section runs as written (on a tiny config)."""

import os
import re

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
