"""Ahead-of-time compilation for a TPU topology on a host without one.

    python -m enas_jax.benchmark --config=configs/cifar_micro.py --aot=tpu:v5e:2x2

libtpu can describe a TPU slice (``jax.experimental.topologies``) and compile
for it on any host: nothing runs, but XLA's cost model (FLOPs, bytes accessed),
the per-chip memory plan and the optimised HLO are all there. A row here
compiles the exact chunk a run dispatches (the jitted multi-step child update
with buffer donation, shardings over the topology's chips, the optimizer, the
controller's sampling) with abstract arguments (``jax.ShapeDtypeStruct``) and
turns the analyses into a roofline estimate per chip from :data:`CHIPS`.

XLA's cost analysis counts a ``while`` loop's body once (the chunk's figures
are one child step) and a ``conditional`` as its costliest branch, FLOPs and
bytes each on their own (measured: docs/performance.md, "TPU").
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import numpy as np

# ----------------------------------------------------------------- chip peaks


@dataclasses.dataclass(frozen=True)
class ChipPeak:
  """Public peak figures of one TPU chip."""

  name: str
  bf16_flops_per_s: float  # dense bf16 matrix peak
  hbm_bytes_per_s: float  # HBM bandwidth
  hbm_bytes: int  # HBM capacity


GB, GiB = 10**9, 2**30
# Sources: the Cloud TPU system-architecture pages, one per generation
# (cloud.google.com/tpu/docs/<version>), "key chip specifications" tables.
CHIPS = {
    # cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16, 32 GiB HBM2 at 1200 GBps.
    "v4": ChipPeak("v4", 275e12, 1200 * GB, 32 * GiB),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, 16 GB HBM2 at 819 GBps.
    "v5e": ChipPeak("v5e", 197e12, 819 * GB, 16 * GiB),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16, 95 GB HBM2e at 2765 GBps.
    "v5p": ChipPeak("v5p", 459e12, 2765 * GB, 95 * GB),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16, 32 GB HBM at 1640 GBps.
    "v6e": ChipPeak("v6e", 918e12, 1640 * GB, 32 * GB),
}
# The page names 16 GB and 32 GB; libtpu plans memory in GiB (16 GiB usable on
# v5e), so HBM capacities are read as GiB where the pages leave it open.

# ------------------------------------------------------------ target parsing


@dataclasses.dataclass(frozen=True)
class Target:
  """A parsed ``--aot`` value: platform, libtpu topology name, chip generation."""

  platform: str  # "tpu"
  topology: str  # libtpu's name, e.g. "v5e:2x2"
  chip: str  # a key of CHIPS


def parse_target(text: str) -> Target:
  """``tpu:<chip>:<shape>`` (``tpu:v5e:2x2``, ``tpu:v5p:2x2x1``) -> :class:`Target`.

  Raises ``ValueError`` saying what is wrong and what is accepted."""
  parts = (text or "").strip().split(":")
  example = "e.g. --aot=tpu:v5e:2x2 (chips: " + ", ".join(CHIPS) + ")"
  if len(parts) != 3 or parts[0].lower() != "tpu":
    raise ValueError(f"--aot={text!r}: expected tpu:<chip>:<shape>, {example}; only TPU "
                     f"topologies can be compiled without the hardware.")
  chip, shape = parts[1].lower(), parts[2].lower()
  if chip not in CHIPS:
    raise ValueError(f"--aot={text!r}: unknown TPU generation {parts[1]!r}; {example}.")
  dims = shape.split("x")
  if not (2 <= len(dims) <= 3 and all(d.isdigit() and int(d) > 0 for d in dims)):
    raise ValueError(f"--aot={text!r}: the shape {parts[2]!r} must be chips per axis joined "
                     f"by x (2x2, 2x4, 2x2x1), {example}.")
  return Target("tpu", f"{chip}:{shape}", chip)


def topology_devices(target: Target):
  """The compile-only devices of the target's slice (libtpu, no hardware)."""
  # libtpu admits one process per host unless told otherwise; compiling needs
  # no exclusive chip, so parallel compiles (test workers) may share it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  chip, shape = target.topology.split(":")
  dims = [int(d) for d in shape.split("x")]
  n_chips = int(np.prod(dims))
  name = target.topology
  if n_chips < 4:
    # libtpu describes whole hosts (2x2 chips or more): a smaller slice is the
    # first chips of one host, and a program for it is compiled on a mesh of those.
    name = f"{chip}:" + "x".join(["2", "2"] + ["1"] * (len(dims) - 2))
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform=target.platform, topology_name=name)
  except ImportError as e:
    raise ValueError(f"cannot describe TPU topology {target.topology!r}: {e}; install the TPU "
                     f"compiler with `pip install -e .[tpu]` (libtpu).") from e
  except Exception as e:  # libtpu missing, or a topology it refuses
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if "topology" in msg.lower() or "divisible" in msg.lower() or "invalid" in msg.lower():
      hint = ("use a slice shape the generation sells, e.g. v5e:1x1, v5e:2x2, v5e:2x4, "
              "v5p:2x2x1, v6e:2x2")
    else:
      hint = "is libtpu installed (`pip install -e .[tpu]`) and importable?"
    raise ValueError(f"cannot describe TPU topology {target.topology!r}: {msg}; {hint}") from e
  devices = list(topo.devices)
  if n_chips < 4:
    per_chip = cores_per_chip(devices)
    devices = devices[:n_chips * per_chip]
  return devices


def cores_per_chip(devices) -> int:
  """Devices per chip: 2 on v4 (each TensorCore is a device when compiled
  without megacore), 1 on v5e/v5p/v6e."""
  chips = {tuple(getattr(d, "coords", (d.id,))) for d in devices}
  return max(1, len(devices) // max(1, len(chips)))


# ------------------------------------------------------------------ roofline


def roofline(flops: float, bytes_accessed: float, items: float, peak: ChipPeak,
             devices_per_chip: int = 1) -> dict:
  """Items per second per chip if one device's step (``flops``, ``bytes_accessed``
  over ``items`` examples or tokens) ran at the chip's peak FLOP rate or at its
  HBM bandwidth, whichever binds first.

  >>> r = roofline(2e10, 1e9, 10, CHIPS["v5e"])  # 2e9 FLOP and 1e8 B per item
  >>> r["bound"], r["roofline_examples_per_s"]
  ('bandwidth', 8190.0)
  """
  if items <= 0:
    raise ValueError(f"items per step must be positive, got {items}.")
  per_flop = flops / items
  per_byte = bytes_accessed / items
  share = 1.0 / devices_per_chip  # a device gets its share of the chip
  flop_rate = peak.bf16_flops_per_s * share / per_flop if per_flop > 0 else float("inf")
  byte_rate = peak.hbm_bytes_per_s * share / per_byte if per_byte > 0 else float("inf")
  per_device = min(flop_rate, byte_rate)
  return {
      "flop_bound_examples_per_s": _round(flop_rate * devices_per_chip),
      "bandwidth_bound_examples_per_s": _round(byte_rate * devices_per_chip),
      "roofline_examples_per_s": _round(per_device * devices_per_chip),
      "bound": "flops" if flop_rate <= byte_rate else "bandwidth",
  }


def _round(x: float) -> float:
  return x if x == float("inf") else round(float(x), 1)


# ----------------------------------------------------------------- analysis


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def analyse(compiled) -> dict:
  """FLOPs, bytes accessed, the per-device memory plan and op counts of a
  compiled program (per device: the program is the partitioned SPMD one)."""
  cost = _cost(compiled)
  mem = compiled.memory_analysis()
  text = compiled.as_text()
  arg = int(getattr(mem, "argument_size_in_bytes", 0))
  out = int(getattr(mem, "output_size_in_bytes", 0))
  alias = int(getattr(mem, "alias_size_in_bytes", 0))
  temp = int(getattr(mem, "temp_size_in_bytes", 0))
  code = int(getattr(mem, "generated_code_size_in_bytes", 0))
  return {
      "flops": float(cost.get("flops", 0.0)),
      "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
      "hbm_argument_bytes": arg,
      "hbm_output_bytes": out,
      "hbm_alias_bytes": alias,
      "hbm_temp_bytes": temp,
      # Donated outputs reuse their argument's buffer.
      "hbm_total_bytes": arg + out - alias + temp + code,
      "conditionals": text.count(" conditional("),
      "convolutions": text.count(" convolution("),
      "while_loops": text.count(" while("),
  }


@contextlib.contextmanager
def count_compiles():
  """Counts the executables built inside the block (``box[0]``): XLA backend
  compilations plus persistent-cache hits (a cached executable is one too)."""
  from jax._src import dispatch, monitoring  # the events jax records per compilation
  box = [0]

  def on_duration(event, duration, **kwargs):
    del duration, kwargs
    if event == dispatch.BACKEND_COMPILE_EVENT:
      box[0] += 1

  def on_event(event, **kwargs):
    del kwargs
    if event == "/jax/compilation_cache/cache_hits":
      box[0] += 1

  monitoring.register_event_duration_secs_listener(on_duration)
  monitoring.register_event_listener(on_event)
  try:
    yield box
  finally:
    monitoring.unregister_event_duration_listener(on_duration)
    monitoring.unregister_event_listener(on_event)


# ------------------------------------------------------------ abstract values


def abstract(tree, sharding):
  """``tree``'s arrays as ``ShapeDtypeStruct`` with ``sharding`` (one for all
  leaves, or a pytree prefix of shardings)."""
  import jax

  def leaf(s, sub):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub)
  if isinstance(sharding, jax.sharding.Sharding):
    return leaf(sharding, tree)
  return jax.tree.map(leaf, sharding, tree, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


def _retarget(x, mesh):
  """A host array placed on the construction mesh -> the same layout on ``mesh``."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  spec = x.sharding.spec if isinstance(getattr(x, "sharding", None), NamedSharding) else P()
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))


def retarget_task(task, mesh) -> None:
  """Points a task built on a one-device host mesh at ``mesh``: its data
  arrays become abstract values with the same partition specs on ``mesh``, and
  every sharding it builds from then on (``state_shardings``, batch shardings
  inside the step) uses ``mesh``. Needs nothing from the task classes beyond
  their ``mesh`` and ``data`` (the dict of arrays every jitted function takes)."""
  task.data = {k: _retarget(v, mesh) for k, v in task.data.items()}
  task.mesh = mesh


def abstract_state(task, key, mesh):
  """The child state as abstract values in the task's shardings on ``mesh``
  (``jax.eval_shape`` of ``init_child``; built concretely on the host when the
  initialiser needs concrete values, as the CIFAR one does)."""
  import jax
  host_mesh = task.mesh
  try:
    state = jax.eval_shape(task.init_child, key)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
          jax.errors.TracerIntegerConversionError):
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                         task.init_child(key))
  task.mesh = mesh
  try:
    return abstract(state, task.state_shardings())
  finally:
    task.mesh = host_mesh


# --------------------------------------------------------------- row inputs


def image_data_shapes(config):
  """An ``ImageData`` of the run's split sizes, every image zero (no memory
  for the stride-0 training set; only shapes matter here)."""
  from enas_jax.data.cifar10 import ImageData
  d = config.data
  if d.source == "synthetic":
    total, num_test = int(d.num_train), int(d.num_test)
  else:  # CIFAR-10: 50,000 training images (less the validation split), 10,000 test
    total, num_test = 50_000, 10_000
  num_valid = int(d.get("num_valid", 0) or 0)
  n_train = total - num_valid

  def images(n):
    return np.broadcast_to(np.zeros((1, 32, 32, 3), np.uint8), (n, 32, 32, 3))
  return ImageData(
      train_x=images(n_train), train_y=np.zeros((n_train,), np.int32),
      valid_x=images(num_valid), valid_y=np.zeros((num_valid,), np.int32),
      test_x=images(num_test), test_y=np.zeros((num_test,), np.int32),
      mean=np.full(3, 0.5, np.float32), std=np.full(3, 0.25, np.float32), source="aot")


# Penn Treebank token counts (with end-of-sentence tokens), the real run's sizes.
PTB_TOKENS = {"train": 929_589, "valid": 73_760, "test": 82_430}


def corpus_shapes(config):
  """A ``Corpus`` of the run's sizes (zeros): PTB's, or the synthetic ones."""
  from enas_jax.data.ptb import Corpus
  d = config.data
  if d.get("source") == "synthetic":
    n = {s: int(d[f"num_{s}_tokens"]) for s in ("train", "valid", "test")}
  else:
    n = PTB_TOKENS
  V = int(d.vocab_size)
  return Corpus(*(np.zeros((n[s],), np.int32) for s in ("train", "valid", "test")),
                vocab=[f"w{i}" for i in range(V)], name="aot")


def prepare_config(config, platform: str):
  """The config with every ``auto`` resolved for ``platform``
  (:func:`enas_jax.backend.resolve_config`)."""
  from enas_jax import backend
  return backend.resolve_config(config, platform=platform)


# ---------------------------------------------------------------------- rows


def row_arc(config, space, row: str):
  """The arc a row trains, as ``(space, arc, config)``: a final config's arc
  (which may change the PTB space and config), else the paper's arc where the
  space has the paper's size, else a fixed uniform sample."""
  import jax
  import numpy as np
  from enas_jax import spaces
  from enas_jax.train.run import named_arc_config, resolve_arc
  if config.mode == "final" and row == "final":
    space, arc = resolve_arc(config, space)
    return space, arc, named_arc_config(config)
  entry = spaces.entry(space.name)
  paper = entry.named_arcs.get("paper")
  if paper is not None and all(getattr(space, f) == paper.space[f] for f in entry.size_fields):
    return space, space.parse(paper.text), config
  return space, np.asarray(space.sample_uniform(jax.random.key(1))), config


def chunk_for_row(task, space, row, arc, config, mesh, place=None):
  """The jitted chunk and controller params of a row: ``shared`` samples a
  fresh arc from the controller each step; ``shared_fixed_arc`` passes one arc
  as a traced argument (exactly as a sampled arc; a closed-over constant could
  let XLA fold the gathers and switches); ``fixed``/``final`` bake it in.
  ``place`` puts the controller params on the mesh (default: replicated
  arrays; :func:`compile_row` passes abstract values)."""
  import jax
  import jax.numpy as jnp
  from enas_jax import controller as ctrl
  from enas_jax import parallel
  if place is None:
    place = lambda tree: parallel.replicate(tree, mesh)  # noqa: E731
  if row == "shared":
    ctrl_cfg = ctrl.ControllerConfig.from_config(config.controller)
    init = lambda k: ctrl.init(k, space.decisions, ctrl_cfg)  # noqa: E731
    ctrl_params = place(init(jax.random.key(2)))
    return task.make_train_chunk(
        lambda p, k: ctrl.sample(p, k, space.decisions, ctrl_cfg)["arc"]), ctrl_params
  if row == "shared_fixed_arc":
    ctrl_params = place({"arc": jnp.asarray(arc, jnp.int32)})
    return task.make_train_chunk(lambda p, k: p["arc"]), ctrl_params
  return task.make_train_chunk(arc_static=arc), {}


def compile_row(config, row: str, target_text: str) -> dict:
  """Compiles one benchmark row (``shared``, ``shared_fixed_arc``, ``fixed``,
  ``final``) for the ``--aot`` target and returns its JSON dict. Nothing runs."""
  import jax
  from jax.sharding import Mesh
  from enas_jax import backend, parallel, spaces
  from enas_jax.train.run import build_space

  target = parse_target(target_text)
  devices = topology_devices(target)
  mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
  n_dev = len(devices)
  config = prepare_config(config, target.platform)
  space = build_space(config)
  space, arc, config = row_arc(config, space, row)
  # The tasks are built on one host device (they place their data there), then
  # pointed at the slice: the least a task needs to change for this.
  host_mesh = parallel.make_mesh(1)
  # As the benchmark: the CIFAR fixed row bakes the arc into the shared child,
  # the PTB one trains the fixed child.
  shared = row in ("shared", "shared_fixed_arc", "fixed")
  batch = int(config.data.batch_size)
  parallel.check_divisible(batch, mesh, "data.batch_size")
  parallel.check_divisible(int(config.data.eval_batch_size), mesh, "data.eval_batch_size")
  lm = spaces.entry(space.name).task == "lm"
  if lm:
    from enas_jax.train.lm import LMTask
    task = LMTask(config, corpus_shapes(config), host_mesh,
                  shared=row in ("shared", "shared_fixed_arc"))
    items, unit = task.batch_size * task.bptt, "token"
  else:
    from enas_jax.train.image import ImageTask
    task = ImageTask(config, image_data_shapes(config), host_mesh, shared=shared,
                     arc=None if shared else arc)
    items, unit = batch, "image"
  state = abstract_state(task, jax.random.key(0), mesh)
  retarget_task(task, mesh)
  rep = parallel.replicated(mesh)
  chunk, ctrl_params = chunk_for_row(task, space, row, arc, config, mesh,
                                     place=lambda t: abstract(t, rep))
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
  num_steps = jax.ShapeDtypeStruct((), np.int32, sharding=rep)
  t0 = time.perf_counter()
  with count_compiles() as compiles:
    lowered = chunk.jitted.lower(task.data, state, ctrl_params, key, num_steps)
    compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  stats = analyse(compiled)
  peak = CHIPS[target.chip]
  per_chip = cores_per_chip(devices)
  items_per_device = items / n_dev
  impl = backend.describe(config)
  cfg = getattr(task, "fns", None)
  cfg = cfg.cfg if cfg is not None else getattr(task, "cc", None)
  kernels = getattr(cfg, "kernels", None) or impl.get("kernels")  # None: no kernel sets (PTB)
  out = {
      "space": space.name, "mode": row, "platform": target.platform,
      "topology": target.topology, "devices": n_dev, "devices_per_chip": per_chip,
      "batch_size": batch, **({"bptt": task.bptt, "hidden_size": task.cc.hidden_size}
                              if lm else
                              {**({"num_layers": int(config.space.num_layers)}
                                  if "num_layers" in config.space else {}),
                               **{f: getattr(space, f) for f in spaces.entry(space.name).size_fields},
                               "out_filters": int(config.child.out_filters)}),
      "kernels": kernels,
      # A child config without the field computes in float32, whatever the config says.
      "compute_dtype": getattr(cfg, "compute_dtype", None) or "float32",
      "op_select": getattr(cfg, "op_select", None) or impl.get("op_select"),
      "remat": getattr(cfg, "remat", None) or config.child.get("remat"),
      "compile_s": round(compile_s, 1), "compile_count": int(compiles[0]),
      "example_unit": unit, "examples_per_step_per_device": items_per_device,
      "flops_per_example": round(stats["flops"] / items_per_device),
      "bytes_per_example": round(stats["bytes_accessed"] / items_per_device),
      **{k: v for k, v in stats.items() if k.startswith("hbm_")},
      "hbm_per_device_bytes": peak.hbm_bytes // per_chip,
      "fits_hbm": stats["hbm_total_bytes"] <= peak.hbm_bytes // per_chip,
      "conditionals": stats["conditionals"], "convolutions": stats["convolutions"],
      "while_loops": stats["while_loops"],
      **roofline(stats["flops"], stats["bytes_accessed"], items_per_device, peak, per_chip),
      "arc": space.format(arc) if row != "shared" else "sampled per step",
  }
  return out


__all__ = ["CHIPS", "ChipPeak", "Target", "parse_target", "topology_devices", "roofline",
           "analyse", "compile_row", "prepare_config", "abstract", "retarget_task", "row_arc",
           "chunk_for_row"]
