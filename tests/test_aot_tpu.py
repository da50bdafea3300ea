"""Compiling for a TPU slice without one (enas_jax.aot, benchmark --aot).

The parsing and roofline tests are plain arithmetic. The compile tests need
libtpu (``pip install -e .[tpu]``) and are skipped without it; those that build
whole training chunks are slow-marked (each compile takes a minute or more on
2 cores)."""

import importlib.util

import numpy as np
import pytest

from enas_jax import aot

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu not installed (pip install -e .[tpu])")


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize("text,topology,chip", [
    ("tpu:v5e:2x2", "v5e:2x2", "v5e"),
    ("TPU:V5P:2x2x1", "v5p:2x2x1", "v5p"),
    (" tpu:v6e:2x4 ", "v6e:2x4", "v6e"),
    ("tpu:v4:2x2x1", "v4:2x2x1", "v4"),
])
def test_parse_target(text, topology, chip):
  t = aot.parse_target(text)
  assert (t.platform, t.topology, t.chip) == ("tpu", topology, chip)


@pytest.mark.parametrize("text,needle", [
    ("v5e:2x2", "expected tpu:<chip>:<shape>"),
    ("gpu:h100:1", "expected tpu:<chip>:<shape>"),
    ("tpu:v9:2x2", "unknown TPU generation 'v9'"),
    ("tpu:v5e:2by2", "the shape '2by2'"),
    ("tpu:v5e:2x0", "the shape '2x0'"),
    ("tpu:v5e:4", "the shape '4'"),
    ("", "expected tpu:<chip>:<shape>"),
])
def test_parse_target_refuses(text, needle):
  with pytest.raises(ValueError, match="--aot=") as e:
    aot.parse_target(text)
  assert needle in str(e.value)
  assert "e.g. --aot=tpu:v5e:2x2" in str(e.value)


# ----------------------------------------------------------------- roofline


def test_roofline_bandwidth_bound():
  v5e = aot.CHIPS["v5e"]
  # 10 images per device-step, 2e9 FLOP and 1e8 bytes each:
  # FLOP-bound 197e12 / 2e9 = 98,500/s; bandwidth-bound 819e9 / 1e8 = 8,190/s.
  r = aot.roofline(2e10, 1e9, 10, v5e)
  assert r["flop_bound_examples_per_s"] == pytest.approx(98_500.0)
  assert r["bandwidth_bound_examples_per_s"] == pytest.approx(8_190.0)
  assert r["roofline_examples_per_s"] == pytest.approx(8_190.0)
  assert r["bound"] == "bandwidth"


def test_roofline_flop_bound_and_cores_per_chip():
  v4 = aot.CHIPS["v4"]
  # 1 token per step: 275e12 / 1e12 = 275/s FLOP-bound, 1.2e12 / 1e6 bandwidth-bound.
  r = aot.roofline(1e12, 1e6, 1, v4)
  assert r["bound"] == "flops"
  assert r["roofline_examples_per_s"] == pytest.approx(275.0)
  # Two devices per chip (v4 without megacore): each gets half the chip, and
  # the chip runs both, so the per-chip rate is the same.
  r2 = aot.roofline(1e12, 1e6, 1, v4, devices_per_chip=2)
  assert r2["roofline_examples_per_s"] == pytest.approx(275.0)
  # Half the work per device-step on two devices: twice the chip's rate.
  r3 = aot.roofline(0.5e12, 0.5e6, 1, v4, devices_per_chip=2)
  assert r3["roofline_examples_per_s"] == pytest.approx(550.0)


def test_roofline_refuses_empty_step():
  with pytest.raises(ValueError, match="items per step must be positive"):
    aot.roofline(1.0, 1.0, 0, aot.CHIPS["v5e"])


def test_chip_table():
  assert set(aot.CHIPS) == {"v4", "v5e", "v5p", "v6e"}
  for peak in aot.CHIPS.values():
    assert 1e14 < peak.bf16_flops_per_s < 1e16
    assert 5e11 < peak.hbm_bytes_per_s < 5e12
    assert 8 * 2**30 <= peak.hbm_bytes <= 128 * 2**30


# ------------------------------------------------------- libtpu: topologies


@needs_libtpu
def test_topology_devices_and_refusal():
  devs = aot.topology_devices(aot.parse_target("tpu:v5e:2x2"))
  assert len(devs) == 4 and aot.cores_per_chip(devs) == 1
  # Fewer chips than a host: the first chips of one (libtpu itself refuses 1x1).
  assert len(aot.topology_devices(aot.parse_target("tpu:v5e:1x1"))) == 1
  assert len(aot.topology_devices(aot.parse_target("tpu:v6e:1x2"))) == 2
  with pytest.raises(ValueError, match="cannot describe TPU topology 'v5e:3x3'"):
    aot.topology_devices(aot.parse_target("tpu:v5e:3x3"))


@needs_libtpu
@pytest.mark.slow
def test_conditional_costs_its_dearest_branch_per_metric():
  """XLA's TPU cost analysis counts a lax.switch as the maximum over its
  branches, FLOPs and bytes each on their own (not the sum, not the branch
  taken): docs/performance.md relies on it for the shared step."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.asarray(aot.topology_devices(aot.parse_target("tpu:v5e:2x2"))), ("data",))
  rep = NamedSharding(mesh, P())
  n = 256

  def flopy(x, w, big):  # many FLOPs, few bytes
    for _ in range(8):
      x = jnp.tanh(x @ w)
    return x

  def bytey(x, w, big):  # few FLOPs, many bytes
    return x + big.reshape(64, n, n).sum(0)

  args = (jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
          jax.ShapeDtypeStruct((n, n), jnp.float32, sharding=rep),
          jax.ShapeDtypeStruct((n, n), jnp.float32, sharding=rep),
          jax.ShapeDtypeStruct((64 * n, n), jnp.float32, sharding=rep))

  def cost(f):
    return aot.analyse(jax.jit(f).lower(*args).compile())

  a = cost(lambda i, x, w, big: flopy(x, w, big))
  b = cost(lambda i, x, w, big: bytey(x, w, big))
  s = cost(lambda i, x, w, big: jax.lax.switch(i, [flopy, bytey], x, w, big))
  assert a["flops"] > 50 * b["flops"] and b["bytes_accessed"] > 2 * a["bytes_accessed"]
  assert s["conditionals"] == 1
  assert s["flops"] == pytest.approx(max(a["flops"], b["flops"]), rel=0.02)
  assert s["bytes_accessed"] == pytest.approx(max(a["bytes_accessed"], b["bytes_accessed"]),
                                              rel=0.02)


# ---------------------------------------------------- libtpu: whole rows


def _final_config(make, space_name, **kw):
  """A tiny final config training a uniformly sampled arc of its space."""
  import jax
  from enas_jax.train.run import build_space
  search = make(**kw)
  space = build_space(search)
  arc = space.format(np.asarray(space.sample_uniform(jax.random.key(0))))
  return make(variant="final", arc=arc, arc_file="", **kw)


def _check_row(row, mode, space):
  assert row["mode"] == mode and row["space"] == space
  assert row["platform"] == "tpu" and row["topology"] == "v5e:2x2" and row["devices"] == 4
  assert row["compile_count"] == 1
  assert row["flops_per_example"] > 0 and row["bytes_per_example"] > 0
  assert row["fits_hbm"] and 0 < row["hbm_total_bytes"] < row["hbm_per_device_bytes"]
  assert row["roofline_examples_per_s"] > 0
  if space != "ptb":
    assert row["kernels"] == "xla" and row["convolutions"] > 0


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("space,row", [("ptb", "shared"), ("cifar_macro", "shared"),
                                       ("cifar_micro", "shared"), ("cifar_micro", "final")])
def test_rows_compile_for_tpu(space, row):
  """The smoke configs (shrunk as the other tests do) compile for a v5e 2x2
  slice: the search chunk with controller sampling (one executable, the op
  choice a conditional) and a final network. Each takes minutes on 2 loaded
  cores, so only one final row (PTB and macro finals passed too; 26 min for
  all six with the conditional test, on a loaded machine)."""
  from conftest import tiny_cifar_config, tiny_ptb_config
  if space == "ptb":
    make = lambda variant="smoke", **kw: tiny_ptb_config(variant, **kw)  # noqa: E731
  else:
    make = lambda variant="smoke", **kw: tiny_cifar_config(space, variant, **kw)  # noqa: E731
  if row == "shared":
    r = aot.compile_row(make(), "shared", "tpu:v5e:2x2")
    _check_row(r, "shared", space)
    assert r["conditionals"] > 0 and r["arc"] == "sampled per step"
  else:
    _check_row(aot.compile_row(_final_config(make, space), "final", "tpu:v5e:2x2"), "final", space)
