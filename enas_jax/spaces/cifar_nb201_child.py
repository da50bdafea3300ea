"""Child networks of the NAS-Bench-201 cell space: weight-shared and fixed.

Both are pytrees plus pure functions, in the calling convention of the other
CIFAR children (:class:`enas_jax.train.image.ImageTask` drives them). NHWC
activations, HWIO 3x3 kernels, ``[C_in, C_out]`` matrices for 1x1 convs.

Skeleton (both children; NAS-Bench-201's ``TinyNetwork``, C=16, N=5)::

  stem     3x3 conv 3 -> C, BN (no ReLU)
  stage 0  N cells at C            (32x32)
  reduce   residual block C -> 2C, stride 2
  stage 1  N cells at 2C           (16x16)
  reduce   residual block 2C -> 4C, stride 2
  stage 2  N cells at 4C           (8x8)
  head     BN -> ReLU -> global average pool -> linear (with bias)

Residual block (the benchmark's ``ResNetBasicblock`` with stride 2, written
from memory of the published code): ``conv_a`` = ReLU -> 3x3 conv stride 2 ->
BN, ``conv_b`` = ReLU -> 3x3 conv -> BN, shortcut = 2x2 average pool stride 2
-> 1x1 conv (no BN, no ReLU); output ``shortcut + conv_b``. Unsure from
memory: whether the shortcut has a BN. Without one, the all-``none`` cell gives
the benchmark's smallest parameter count, 73,306 on CIFAR-10 (checked in the
tests), and NASLib's port of the block has none either, which is why we
believe it has none. Also unsure: the benchmark's fixed networks could use
their own BN settings; we take ``affine`` and tracked statistics (PyTorch's
defaults) for the skeleton and the fixed cells. The stride-2 conv pads one pixel
on every side, as PyTorch's ``padding=1`` (TF's SAME pads only the end at even
sizes): it is computed as a SAME stride-1 conv sampled at even positions.

Cell (4 nodes): node 0 is the cell input, node ``j`` the sum of its incoming
edges' ops, the cell output node 3. Ops keep the channels: ``none`` (zeros),
``skip_connect``, ``nor_conv_1x1`` / ``nor_conv_3x3`` (ReLU -> conv -> BN),
``avg_pool_3x3`` (stride 1, divisor without the padding, as
``count_include_pad=False``).

Weight-shared child (search): :func:`init_shared`, :func:`apply_shared`
-----------------------------------------------------------------------
``params["cells"][k]`` = ``{"conv1x1": {"w": [E, C, C]}, "conv3x3": {"w":
[E, 3, 3, C, C]}}`` and ``batch_stats["cells"][k]`` = ``{"conv1x1": {"mean",
"var": [E, C]}, "conv3x3": ...}``: weights and BN statistics per (cell, edge,
op), stacked over the ``E`` edges (the edge index is static, only the op is
traced). As the benchmark's ENAS search network (``affine=False``,
``track_running_stats=True``), the ops' BNs have no scale or offset, the stem,
residual and head BNs have them. Each edge's op is chosen by
:func:`conv_ops.select_branch` from the traced arc (``lax.switch``, or every op
and a ``jnp.where`` mask: the resolved ``child.op_select``): one compilation
serves every arc; unchosen ops get exactly zero gradient and their moving
averages do not move. A numpy arc bakes the arc in (direct op calls). BN:
``train`` normalises with the batch statistics and moves the averages,
otherwise the moving averages (the benchmark's ENAS scored arcs in evaluation
mode).

Fixed child (final training): :func:`init_fixed`, :func:`apply_fixed`
---------------------------------------------------------------------
Only the arc's convolutions get parameters: ``params["cells"][k]["edge_j_i"]``
= ``{"w", "bn"}`` for a conv on edge ``i -> j``. ``none`` edges are dropped; a
node with no other incoming edge is zero, and the edges leaving it still run on
the zeros (a conv's BN then gives its offset, as the benchmark's code does).
BN: batch statistics and moving-average updates when ``train``, moving averages
otherwise.

Initialisation: Keras ``he_normal`` (truncated, std ``sqrt(2 / fan_in)``) for
every conv and the classifier's weights, bias 0; BN scale 1, offset 0, moving
mean 0, variance 1. *Difference*: the benchmark used PyTorch's default
initialisation (Kaiming-uniform with ``a = sqrt(5)``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from enas_jax import backend, remat
from enas_jax.spaces import base, cifar_nb201
from enas_jax.spaces import conv_ops as ops
from enas_jax.spaces.cifar_nb201 import AVGPOOL, CONV1, CONV3, NONE, SKIP

NUM_STAGES = 3
_CONV_OPS = {CONV1: ("conv1x1", 1), CONV3: ("conv3x3", 3)}  # op -> (shared key, kernel)


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class NB201ChildConfig(backend.ResolvedChild):
  """Static settings of a NAS-Bench-201 child (hashable: safe to close over in jit).

  ``kernels``, ``compute_dtype`` and ``op_select`` accept ``"auto"`` and hold
  the values :func:`enas_jax.backend.resolve` gives for ``platform`` (the
  running backend when None; set to the target when compiling for another).
  """
  cells_per_stage: int = 5  # N (benchmark 5)
  num_nodes: int = 4  # nodes per cell, the input included (benchmark 4)
  out_filters: int = 16  # C, the first stage's channels (benchmark 16)
  num_classes: int = 10
  bn_decay: float = 0.9  # PyTorch momentum 0.1
  bn_eps: float = 1e-5
  kernels: str = "auto"
  compute_dtype: str = "auto"
  op_select: str = "auto"
  platform: str | None = None
  checkpoint_branches: bool = True
  remat: str = "none"

  def __post_init__(self):
    for name, lo in (("cells_per_stage", 1), ("num_nodes", 2), ("out_filters", 1),
                     ("num_classes", 2)):
      v = getattr(self, name)
      if not _is_int(v) or v < lo:
        raise ValueError(f"cifar_nb201 child: {name} must be an integer >= {lo}, got {v!r}.")
    if not 0.0 <= self.bn_decay < 1.0:
      raise ValueError(f"child.bn_decay must be in [0, 1), got {self.bn_decay!r}.")
    if not self.bn_eps > 0.0:
      raise ValueError(f"child.bn_eps must be > 0, got {self.bn_eps!r}.")
    if not isinstance(self.checkpoint_branches, (bool, np.bool_)):
      raise ValueError(f"child.checkpoint_branches must be True or False, got "
                       f"{self.checkpoint_branches!r}.")
    if self.remat not in ("none", "cells"):
      raise ValueError(f"child.remat must be 'none' or 'cells' for the NAS-Bench-201 space, "
                       f"got {self.remat!r}.")
    self._resolve_impl()

  @property
  def num_cells(self) -> int:
    return NUM_STAGES * self.cells_per_stage

  def stage_channels(self, stage: int) -> int:
    return self.out_filters * 2 ** stage

  @classmethod
  def from_config(cls, config) -> NB201ChildConfig:
    """From a run config: ``space.{cells_per_stage, num_nodes}``, ``child.*``
    (``out_filters`` required, the rest optional with the defaults above) and
    ``data.num_classes`` if present."""
    s, c = config.space, config.child
    if c.get("out_filters", None) is None:
      raise ValueError("cifar_nb201 child: config.child.out_filters is required.")
    data = config.get("data", None)
    d = cls.__dataclass_fields__
    return cls(
        cells_per_stage=s.get("cells_per_stage", d["cells_per_stage"].default),
        num_nodes=s.get("num_nodes", d["num_nodes"].default),
        out_filters=c.out_filters,
        num_classes=data.get("num_classes", 10) if data is not None else 10,
        **{k: c.get(k, d[k].default) for k in (
            "bn_decay", "bn_eps", "kernels", "compute_dtype", "op_select", "platform",
            "checkpoint_branches", "remat")})


@functools.cache
def _codec(num_nodes: int) -> cifar_nb201.NB201Codec:
  return cifar_nb201.NB201Codec(num_nodes)


def _edge_key(j: int, i: int) -> str:
  return f"edge_{j}_{i}"


# ----------------------------------------------------------------- building blocks
def _relu(x):
  return jax.nn.relu(x)


def _bn(x, p, s, cfg, train):
  return ops.batch_norm(x, p, s, train=train, kernels=cfg.kernels, decay=cfg.bn_decay,
                        eps=cfg.bn_eps)


@ops.scoped("conv1x1")
def _conv1x1(x_NHWC, w_IO):
  n, h, w, c = x_NHWC.shape
  return (x_NHWC.reshape(n * h * w, c) @ w_IO.astype(x_NHWC.dtype)).reshape(
      n, h, w, w_IO.shape[-1])


def _relu_conv(x, w, cfg):
  """ReLU -> conv (1x1 ``[C, C]`` or 3x3 HWIO), stride 1."""
  x = _relu(x)
  return _conv1x1(x, w) if w.ndim == 2 else ops.conv2d(x, w, kernels=cfg.kernels)


def _init_conv_bn(key, k, cin, cout):
  shape = (cin, cout) if k == 1 else (k, k, cin, cout)
  return {"w": ops.he_normal(key, shape, fan_in=k * k * cin), "bn": ops.bn_params(cout)}, \
      {"bn": ops.bn_stats(cout)}


def _init_stem(key, cfg):
  return _init_conv_bn(key, 3, 3, cfg.out_filters)


def _stem(p, s, images, cfg, train):
  x = ops.conv2d(images.astype(cfg.dtype), p["w"], kernels=cfg.kernels)
  x, st = _bn(x, p["bn"], s["bn"], cfg, train)
  return x, {"bn": st}


def _init_resblock(key, cin, cout):
  ka, kb, kd = jax.random.split(key, 3)
  pa, sa = _init_conv_bn(ka, 3, cin, cout)
  pb, sb = _init_conv_bn(kb, 3, cout, cout)
  return ({"conv_a": pa, "conv_b": pb,
           "down": {"w": ops.he_normal(kd, (cin, cout), fan_in=cin)}},
          {"conv_a": sa, "conv_b": sb})


@ops.scoped("resblock")
def _resblock(p, s, x, cfg, train):
  """The stride-2 residual block between stages (module docstring)."""
  # PyTorch's 3x3, stride 2, padding 1: SAME stride 1, then every other pixel.
  a = ops.conv2d(_relu(x), p["conv_a"]["w"], kernels=cfg.kernels)[:, ::2, ::2, :]
  a, sa = _bn(a, p["conv_a"]["bn"], s["conv_a"]["bn"], cfg, train)
  b, sb = _bn(_relu_conv(a, p["conv_b"]["w"], cfg), p["conv_b"]["bn"], s["conv_b"]["bn"], cfg,
              train)
  n, h, w, c = x.shape
  pooled = jnp.mean(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))
  return _conv1x1(pooled, p["down"]["w"]) + b, {"conv_a": {"bn": sa}, "conv_b": {"bn": sb}}


def _init_head(key, cfg):
  c = cfg.stage_channels(NUM_STAGES - 1)
  return ({"bn": ops.bn_params(c)},
          {"bn": ops.bn_stats(c)},
          {"w": ops.he_normal(key, (c, cfg.num_classes), fan_in=c),
           "b": jnp.zeros((cfg.num_classes,), jnp.float32)})


def _head(p_last, s_last, p_fc, x, cfg, train):
  x, st = _bn(x, p_last["bn"], s_last["bn"], cfg, train)
  h = jnp.mean(_relu(x), axis=(1, 2)).astype(jnp.float32)
  return h @ p_fc["w"] + p_fc["b"], {"bn": st}


def _check_images(images, cfg):
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"cifar_nb201 child: images must be [N, H, W, 3], got {images.shape}.")
  if images.shape[1] % 4 or images.shape[2] % 4:
    raise ValueError(f"cifar_nb201 child: image height and width must be multiples of 4 (two "
                     f"stride-2 blocks), got {images.shape[1:3]}.")


def _network(params, batch_stats, images, cfg, train, run_cell):
  """The skeleton around the cells: ``run_cell(k, p, s, x) -> (x, new s)``."""
  _check_images(images, cfg)
  new = {}
  x, new["stem"] = _stem(params["stem"], batch_stats["stem"], images, cfg, train)
  cells, reduce = [], []
  for k in range(cfg.num_cells):
    stage, pos = divmod(k, cfg.cells_per_stage)
    if pos == 0 and stage > 0:
      x, rs = _resblock(params["reduce"][stage - 1], batch_stats["reduce"][stage - 1], x, cfg,
                        train)
      reduce.append(rs)
    x, cs = run_cell(k, params["cells"][k], batch_stats["cells"][k], x)
    cells.append(cs)
  new["cells"], new["reduce"] = cells, reduce
  logits, new["lastact"] = _head(params["lastact"], batch_stats["lastact"], params["fc"], x,
                                 cfg, train)
  return logits, new


def _init_network(key, cfg, init_cell):
  """``(params, batch_stats)``: the skeleton plus ``init_cell(key, C) -> (p, s)`` per cell."""
  keys = jax.random.split(key, cfg.num_cells + NUM_STAGES + 2)
  params, stats = {}, {}
  params["stem"], stats["stem"] = _init_stem(keys[0], cfg)
  cells_p, cells_s, red_p, red_s = [], [], [], []
  for k in range(cfg.num_cells):
    stage, pos = divmod(k, cfg.cells_per_stage)
    C = cfg.stage_channels(stage)
    if pos == 0 and stage > 0:
      p, s = _init_resblock(keys[cfg.num_cells + stage], C // 2, C)
      red_p.append(p)
      red_s.append(s)
    p, s = init_cell(keys[1 + k], C)
    cells_p.append(p)
    cells_s.append(s)
  params["cells"], stats["cells"] = cells_p, cells_s
  params["reduce"], stats["reduce"] = red_p, red_s
  params["lastact"], stats["lastact"], params["fc"] = _init_head(keys[-1], cfg)
  return params, stats


# Number of parameters (moving statistics are not parameters, as in PyTorch).
count_params = base.count_params


def l2_params(params):
  """The weights the L2 penalty covers: all of them (the benchmark's SGD weight
  decay covers every parameter, BN scale and offset and the classifier bias
  included)."""
  return params


# ------------------------------------------------------------------ shared child
def init_shared(key: jax.Array, cfg: NB201ChildConfig):
  """Shared weights and moving statistics of the search child: ``(params, batch_stats)``."""
  E = _codec(cfg.num_nodes).arc_length

  def init_cell(key, C):
    p, s = {}, {}
    for (name, k), kk in zip(_CONV_OPS.values(), jax.random.split(key)):
      shape = (E, C, C) if k == 1 else (E, k, k, C, C)
      p[name] = {"w": ops.he_normal(kk, shape, fan_in=k * k * C)}
      s[name] = {"mean": jnp.zeros((E, C), jnp.float32), "var": jnp.ones((E, C), jnp.float32)}
    return p, s

  return _init_network(key, cfg, init_cell)


def _shared_branches(cfg, train):
  """The five ops of an edge: ``(x, edge weights, edge statistics) -> (y, edge
  statistics)``; a conv replaces only its own op's statistics (an unchosen op's
  moving averages never move), the other ops return them as they are."""
  def conv(name):
    def f(operand):
      x, w, s = operand
      y, st = _bn(_relu_conv(x, w[name]["w"], cfg), None, s[name], cfg, train)
      return y, dict(s, **{name: st})
    return f
  return [lambda op: (jnp.zeros_like(op[0]), op[2]),
          lambda op: (op[0], op[2]),
          conv("conv1x1"),
          conv("conv3x3"),
          lambda op: (ops.avg_pool(op[0], 3, 1, kernels=cfg.kernels), op[2])]


def apply_shared(params, batch_stats, arc, images_NHWC, *, train: bool, key, cfg):
  """The weight-shared child on one arc: ``(logits, None, new_batch_stats)``.

  ``arc``: a traced/jax int array (one compilation for every arc; its values
  are not checked on the device, validate arcs before), or a numpy array to
  bake the arc in (validated). ``train``: every BN normalises with the batch
  statistics and moves its averages (the chosen ops' only); otherwise the
  moving averages (the benchmark's ENAS rewards ran the shared network in
  evaluation mode). ``key`` is unused (no dropout in this space).
  """
  del key
  codec = _codec(cfg.num_nodes)
  static = isinstance(arc, np.ndarray)
  if static:
    arc = codec.validate(arc)
  else:
    arc = jnp.asarray(arc)
    if arc.shape != (codec.arc_length,) or not jnp.issubdtype(arc.dtype, jnp.integer):
      raise ValueError(f"cifar_nb201: a traced arc must be an integer array of shape "
                       f"({codec.arc_length},), got {arc.dtype}{list(arc.shape)}.")
    arc = arc.astype(jnp.int32)
  branches = _shared_branches(cfg, train)

  def run_cell(k, p, s, x):
    nodes = [x]
    new_s = [None] * codec.arc_length
    for j in range(1, cfg.num_nodes):
      total = None
      for i in range(j):
        e = codec.edges.index((j, i))
        pick = lambda t, e=e: jax.tree.map(lambda a: a[e], t)  # noqa: E731
        y, new_s[e] = ops.select_branch(arc[e], branches, (nodes[i], pick(p), pick(s)),
                                        mode=cfg.op_select, kernels=cfg.kernels,
                                        checkpoint=cfg.checkpoint_branches and not static)
        total = y if total is None else total + y
      nodes.append(total)
    return nodes[-1], jax.tree.map(lambda *a: jnp.stack(a), *new_s)

  return _with_none(_network(params, batch_stats, images_NHWC, cfg, train, run_cell))


def _with_none(out):
  logits, stats = out
  return logits, None, stats


# ------------------------------------------------------------------- fixed child
def _static_arc(arc, cfg, where):
  if not isinstance(arc, (np.ndarray, list, tuple)):
    raise ValueError(
        f"cifar_nb201 {where}: the fixed child needs a concrete numpy arc (it builds only the "
        f"arc's ops); got {type(arc).__name__}. Use apply_shared for a traced arc.")
  return _codec(cfg.num_nodes).validate(np.asarray(arc))


def init_fixed(key: jax.Array, cfg: NB201ChildConfig, arc):
  """Parameters and moving statistics of the fixed child of ``arc`` (numpy,
  validated): ``(params, batch_stats)``; only the arc's convs have parameters."""
  arc = _static_arc(arc, cfg, "init_fixed")
  codec = _codec(cfg.num_nodes)

  def init_cell(key, C):
    p, s = {}, {}
    for (j, i), op, kk in zip(codec.edges, arc.tolist(), jax.random.split(key, len(arc))):
      if op in _CONV_OPS:
        p[_edge_key(j, i)], s[_edge_key(j, i)] = _init_conv_bn(kk, _CONV_OPS[op][1], C, C)
    return p, s

  return _init_network(key, cfg, init_cell)


def _fixed_cell(diff, extra, *, arc, cfg, train):
  """One fixed cell: ``(output, new statistics)``."""
  del extra
  p, s, x = diff
  codec = _codec(cfg.num_nodes)
  nodes, new = [x], {}
  for j in range(1, cfg.num_nodes):
    terms = []
    for i in range(j):
      op = int(arc[codec.edges.index((j, i))])
      if op == NONE:
        continue
      if op == SKIP:
        terms.append(nodes[i])
      elif op == AVGPOOL:
        terms.append(ops.avg_pool(nodes[i], 3, 1, kernels=cfg.kernels))
      else:
        name = _edge_key(j, i)
        y, st = _bn(_relu_conv(nodes[i], p[name]["w"], cfg), p[name]["bn"], s[name]["bn"], cfg,
                    train)
        new[name] = {"bn": st}
        terms.append(y)
    nodes.append(functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(x))
  return nodes[-1], new


def apply_fixed(params, batch_stats, arc, images_NHWC, *, train: bool, key, cfg,
                progress=0.0):
  """The fixed child of ``arc`` (the numpy arc :func:`init_fixed` was given):
  ``(logits, None, new_batch_stats)``. ``train``: batch statistics and
  moving-average updates; otherwise the moving averages. ``key`` and
  ``progress`` are unused (no dropout or drop-path in this space)."""
  del key, progress
  arc = _static_arc(arc, cfg, "apply_fixed")

  def run_cell(k, p, s, x):
    run = functools.partial(_fixed_cell, arc=arc, cfg=cfg, train=train)
    if cfg.remat == "cells" and train:
      run = remat.recompute_in_backward(run, cfg.kernels)
    return run((p, s, x), None)

  return _with_none(_network(params, batch_stats, images_NHWC, cfg, train, run_cell))


def fixed_from_shared(shared_params, shared_stats, arc, cfg: NB201ChildConfig):
  """The fixed child of ``arc`` with the shared child's weights and moving
  statistics: ``(params, batch_stats)``. Each conv edge takes its op's weights and
  statistics, with BN scale 1 and offset 0 (the search ops' BN has none); the
  skeleton is taken as is. The fixed network then computes what
  :func:`apply_shared` computes on ``arc``, in both BN modes."""
  arc = _static_arc(arc, cfg, "fixed_from_shared")
  codec = _codec(cfg.num_nodes)
  params = {k: v for k, v in shared_params.items() if k != "cells"}
  stats = {k: v for k, v in shared_stats.items() if k != "cells"}
  params["cells"], stats["cells"] = [], []
  for p, s in zip(shared_params["cells"], shared_stats["cells"]):
    cp, cs = {}, {}
    for e, ((j, i), op) in enumerate(zip(codec.edges, arc.tolist())):
      if op in _CONV_OPS:
        name = _CONV_OPS[op][0]
        C = p[name]["w"].shape[-1]
        cp[_edge_key(j, i)] = {"w": p[name]["w"][e], "bn": ops.bn_params(C)}
        cs[_edge_key(j, i)] = {"bn": jax.tree.map(lambda a, e=e: a[e], s[name])}
    params["cells"].append(cp)
    stats["cells"].append(cs)
  return params, stats


__all__ = [
  "NB201ChildConfig",
  "apply_fixed",
  "apply_shared",
  "count_params",
  "fixed_from_shared",
  "init_fixed",
  "init_shared",
  "l2_params",
]
