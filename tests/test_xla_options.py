"""enas_jax.xla_options: when the XLA:CPU compile options are added to XLA_FLAGS,
when they are left out, and that XLA reads what ``import enas_jax`` set."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from enas_jax import xla_options


@pytest.fixture
def env(monkeypatch):
  """A clean switch and XLA_FLAGS; no accelerator package; no backend up yet."""
  monkeypatch.delenv(xla_options.ENV_SWITCH, raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
  monkeypatch.setattr(xla_options, "accelerator_installed", lambda: False)
  monkeypatch.setattr(xla_options, "_backends_started", lambda: False)
  return monkeypatch


def test_auto_adds_the_options_after_the_users_flags(env):
  assert xla_options.apply()
  assert os.environ["XLA_FLAGS"] == ("--xla_cpu_multi_thread_eigen=false "
                                     "--xla_backend_extra_options="
                                     "xla_cpu_disable_loop_unrolling,-disable-lsr")
  assert xla_options.apply() and os.environ["XLA_FLAGS"].count("--xla_backend_extra") == 1


def test_auto_leaves_accelerator_hosts_alone_and_on_forces(env):
  env.setattr(xla_options, "accelerator_installed", lambda: True)
  assert not xla_options.apply() and "extra_options" not in os.environ["XLA_FLAGS"]
  env.setenv(xla_options.ENV_SWITCH, "1")
  assert xla_options.apply()


@pytest.mark.parametrize("switch,flags", [
    ("0", "--xla_cpu_multi_thread_eigen=false"),
    ("", "--xla_backend_extra_options=-enable-unsafe-fp-math"),  # the user's own wins
])
def test_off_or_users_own_extra_options_are_left_alone(env, switch, flags):
  env.setenv(xla_options.ENV_SWITCH, switch)
  env.setenv("XLA_FLAGS", flags)
  assert not xla_options.apply() and os.environ["XLA_FLAGS"] == flags


def test_too_late_once_a_backend_is_up(env):
  env.setattr(xla_options, "_backends_started", lambda: True)
  assert not xla_options.apply() and "extra_options" not in os.environ["XLA_FLAGS"]


def test_unknown_switch_value_is_a_clear_error(env):
  env.setenv(xla_options.ENV_SWITCH, "maybe")
  with pytest.raises(ValueError, match="ENAS_JAX_CPU_COMPILE_OPTIONS='maybe'.*0 .*1 "):
    xla_options.apply()


def _python(code, **env):
  full = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", **env)
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full,
                        capture_output=True, text=True, timeout=120)


def test_xla_reads_the_flags_that_importing_enas_jax_sets():
  # The options reach a compile when set after `import jax` (what importing
  # enas_jax does): a bogus LLVM option set the same way is refused by XLA.
  ok = _python("import os, jax, enas_jax; print(os.environ['XLA_FLAGS']); "
               "print(int(jax.jit(lambda x: x * 2)(21)))", ENAS_JAX_CPU_COMPILE_OPTIONS="1")
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert ok.stdout.split() == [xla_options.OPTION, "42"]
  bad = _python("import os, jax; os.environ['XLA_FLAGS'] = "
                "'--xla_backend_extra_options=-no-such-llvm-option-enas'; "
                "print(int(jax.jit(lambda x: x * 2)(21)))")
  assert bad.returncode != 0 and "no-such-llvm-option-enas" in bad.stderr, bad.stderr[-2000:]
