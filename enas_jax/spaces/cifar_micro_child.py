"""Child networks of the CIFAR-10 micro (cell) space: weight-shared and fixed.

Pytrees plus pure functions. Activations NHWC, 1x1 convolutions ``[C_in,
C_out]`` matrices, depthwise kernels ``[k, k, C]``, other kernels HWIO.

Skeleton (both): stem 3x3 conv 3 -> 3C + BN; ``num_layers + 2`` cells with
reduction cells at ``[pd, 2pd + 1]`` (``pd = num_layers // 3``, C doubled at
each); an optional auxiliary head after cell ``2pd + 2``; head ReLU -> global
average pool -> dropout (training) -> FC without bias. A cell reads ``[older,
newer]``, both calibrated to C channels at the newer one's resolution
(factorized reduction, or ReLU -> 1x1 -> BN). Every cell has its own weights.

* Search (:func:`init_shared`, :func:`apply_shared`): every cell owns all ops'
  weights, one set per input index as in the original (layout:
  :func:`init_shared`). The arc is a traced int32 array, so one compilation
  serves every arc; a numpy arc bakes it in (the tests' reference). With
  ``checkpoint_branches`` a cell is one custom VJP that runs its nodes as a
  scan over a node buffer and recomputes each taken op in the backward pass,
  saving only the buffer. The cell output (concat of loose ends -> ReLU -> 1x1
  -> BN) is computed at a fixed shape. As in the original, every BN uses batch
  statistics; ``train`` switches only head dropout and the aux logits (the
  original also kept dropout on when it evaluated the shared child: pass
  ``train=True`` for that).
* Final (:func:`init_fixed`, :func:`apply_fixed`): only the arc's ops have
  parameters; the output is the concat of loose ends; drop-path on ops 0-3
  with the original's schedule (:func:`drop_path_keep`); BN batch statistics
  when ``train``, moving averages otherwise.
* ``scan_layers`` (both): consecutive cells of identical shapes run as one
  ``lax.scan`` over their weights, stacked inside the step, so that XLA
  compiles such a cell once per run, not once per cell (compile time: see
  docs/performance.md). The function and the parameter layout (one entry per
  cell) are the same either way, so checkpoints are interchangeable.
* Auxiliary head (``params["aux"]``): ReLU -> 5x5 average pool stride 3 ->
  1x1 conv 128 -> BN -> ReLU -> 2x2 conv 768 -> BN -> ReLU -> global pool ->
  FC; its BNs always use batch statistics. *Difference*: the original never
  trained it (random init, no L2); here it is trained (``CE + 0.4 CE_aux``),
  and :func:`count_params` with ``exclude_aux`` gives the original's count.
  The pool window is ``min(5, H)`` so that small test images work.
* Initialisation: Keras ``he_normal`` with the fan-in of the original
  variable's shape; for the search tables (``w_depth``, ``w_point``,
  ``final.w``) that is their number of rows (``b + 2``, ``B + 2``), a Keras
  quirk kept on purpose. BN scale 1, offset 0; moving mean 0, variance 1.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from enas_jax import backend, remat
from enas_jax import kernels as kernel_sets
from enas_jax.spaces import base
from enas_jax.spaces import cifar_micro
from enas_jax.spaces import conv_ops as ops

SEP_KERNELS = (3, 5)  # op 0 and op 1
AUX_POOL, AUX_POOL_STRIDE, AUX_PROJ, AUX_KERNEL, AUX_WIDTH = 5, 3, 128, 2, 768


@dataclasses.dataclass(frozen=True)
class MicroChildConfig(backend.ResolvedChild):
  """Static settings of a micro child (hashable: safe to close over in jit).

  ``kernels``, ``compute_dtype`` and ``op_select`` accept ``"auto"`` and hold
  the values :func:`enas_jax.backend.resolve` gives for ``platform`` (the
  running backend when None; set to the target when compiling for another);
  ``scan_layers`` accepts ``"auto"`` too (:func:`enas_jax.backend.resolve_scan_layers`).
  """
  num_layers: int
  num_nodes: int = 5
  out_filters: int = 20
  num_classes: int = 10
  keep_prob: float = 0.9
  drop_path_keep_prob: float = 0.6
  use_aux_heads: bool = True
  bn_decay: float = 0.9
  bn_eps: float = 1e-5
  kernels: str = "auto"
  compute_dtype: str = "auto"
  op_select: str = "auto"
  platform: str | None = None
  checkpoint_branches: bool = True
  remat: str = "none"
  scan_layers: bool | str = "auto"

  def __post_init__(self):
    def need_int(name, lo):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"cifar_micro child: {name} must be an integer >= {lo}, got {v!r}.")
    need_int("num_layers", 1)
    need_int("num_nodes", 1)
    need_int("out_filters", 1)
    need_int("num_classes", 2)
    for name in ("keep_prob", "drop_path_keep_prob"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
        raise ValueError(f"child.{name} is a keep probability in (0, 1], got {v!r}.")
    if not 0.0 <= self.bn_decay < 1.0:
      raise ValueError(f"child.bn_decay must be in [0, 1), got {self.bn_decay!r}.")
    if not self.bn_eps > 0.0:
      raise ValueError(f"child.bn_eps must be > 0, got {self.bn_eps!r}.")
    object.__setattr__(self, "scan_layers",
                       backend.resolve_scan_layers(self.scan_layers, self.platform))
    if self.remat not in ("none", "cells"):
      raise ValueError(f"child.remat must be 'none' or 'cells', got {self.remat!r}.")
    self._resolve_impl()

  @classmethod
  def from_config(cls, config) -> MicroChildConfig:
    """From a run config: ``space.{num_layers, num_nodes}`` and ``child.*``
    (``out_filters`` required; the rest optional with the defaults above);
    ``data.num_classes`` if present."""
    s, c = config.space, config.child
    data = config.get("data", None)
    num_classes = data.get("num_classes", 10) if data is not None else 10
    for sec, name, node in (("space", "num_layers", s), ("child", "out_filters", c)):
      if node.get(name, None) is None:
        raise ValueError(f"cifar_micro child: config.{sec}.{name} is required.")
    d = cls.__dataclass_fields__
    return cls(
        num_layers=s.num_layers, num_nodes=s.get("num_nodes", d["num_nodes"].default),
        out_filters=c.out_filters, num_classes=num_classes,
        **{k: c.get(k, d[k].default) for k in (
            "keep_prob", "drop_path_keep_prob", "use_aux_heads", "bn_decay", "bn_eps",
            "op_select", "kernels", "compute_dtype", "platform", "checkpoint_branches",
            "remat", "scan_layers")})

  @property
  def reduction_cells(self) -> tuple[int, int]:
    pd = self.num_layers // 3
    return (pd, 2 * pd + 1)

  @property
  def aux_cell(self) -> int:
    """The cell after which the auxiliary head reads (``2 pd + 2``)."""
    return self.reduction_cells[1] + 1

  @property
  def num_cells(self) -> int:
    return self.num_layers + 2


# ----------------------------------------------------------------- building blocks
def _relu(x):
  return jax.nn.relu(x)


@ops.scoped("conv1x1")
def _conv1x1(x_NHWC, w_IO):
  # A 2-D matrix product: faster than the equivalent 4-D einsum (docs/performance.md).
  n, h, w, c = x_NHWC.shape
  return (x_NHWC.reshape(n * h * w, c) @ w_IO.astype(x_NHWC.dtype)).reshape(
      n, h, w, w_IO.shape[-1])


def _init_conv_bn(key, cin, cout):
  """ReLU -> 1x1 -> BN (the original's calibration / ``layer_base``)."""
  return {"w": ops.he_normal(key, (cin, cout), fan_in=cin), "bn": ops.bn_params(cout)}, \
      ops.bn_stats(cout)


def _conv_bn(p, s, x, cfg, train):
  return ops.batch_norm(_conv1x1(_relu(x), p["w"]), p["bn"], s, train=train, kernels=cfg.kernels,
                        decay=cfg.bn_decay, eps=cfg.bn_eps)


def _init_fr(key, cin, cout):
  """Factorized reduction (two 1x1 paths of ``cout // 2``) + BN."""
  k1, k2 = jax.random.split(key)
  half = cout // 2
  return {"w1": ops.he_normal(k1, (cin, half), fan_in=cin),
          "w2": ops.he_normal(k2, (cin, cout - half), fan_in=cin),
          "bn": ops.bn_params(cout)}, ops.bn_stats(cout)


def _fr_bn(p, s, x, cfg, train, relu=False):
  if relu:
    x = _relu(x)
  return ops.batch_norm(ops.factorized_reduce(x, p["w1"], p["w2"]), p["bn"], s, train=train,
                        kernels=cfg.kernels,
                        decay=cfg.bn_decay, eps=cfg.bn_eps)


def _init_stem(key, cfg):
  c3 = 3 * cfg.out_filters
  return {"w": ops.he_normal(key, (3, 3, 3, c3)), "bn": ops.bn_params(c3)}, ops.bn_stats(c3)


def _stem(p, s, images, cfg, train):
  x = ops.conv2d(images.astype(cfg.dtype), p["w"], kernels=cfg.kernels)
  return ops.batch_norm(x, p["bn"], s, train=train, kernels=cfg.kernels, decay=cfg.bn_decay,
                        eps=cfg.bn_eps)


def _init_head(key, c_last, cfg):
  return {"w": ops.he_normal(key, (c_last, cfg.num_classes), fan_in=c_last)}


def _dropout(x, keep, key):
  if keep >= 1.0:
    return x
  mask = jax.random.bernoulli(key, keep, x.shape)
  return jnp.where(mask, x / keep, 0.0)


def _head(p, x, cfg, train, key):
  x = jnp.mean(_relu(x), axis=(1, 2))
  if train:
    x = _dropout(x, cfg.keep_prob, key)
  return (x @ p["w"].astype(x.dtype)).astype(jnp.float32)


def _init_aux(key, cin, cfg):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"proj": {"w": ops.he_normal(k1, (cin, AUX_PROJ), fan_in=cin),
                   "bn": ops.bn_params(AUX_PROJ)},
          "conv": {"w": ops.he_normal(k2, (AUX_KERNEL, AUX_KERNEL, AUX_PROJ, AUX_WIDTH)),
                   "bn": ops.bn_params(AUX_WIDTH)},
          "fc": {"w": ops.he_normal(k3, (AUX_WIDTH, cfg.num_classes), fan_in=AUX_WIDTH)}}


def _aux_head(p, x_NHWC, cfg):
  """The auxiliary classifier; its BNs always use batch statistics."""
  x = _relu(x_NHWC)
  k = min(AUX_POOL, x.shape[1], x.shape[2])
  x = jax.lax.reduce_window(x, np.zeros((), x.dtype), jax.lax.add, (1, k, k, 1),
                            (1, AUX_POOL_STRIDE, AUX_POOL_STRIDE, 1), "VALID") / (k * k)
  bn = lambda y, q: ops.batch_norm(y, q, None, train=True, kernels=cfg.kernels,
                                   eps=cfg.bn_eps)[0]
  x = _relu(bn(_conv1x1(x, p["proj"]["w"]), p["proj"]["bn"]))
  # Outside every switch: XLA's own convolution in both kernel sets.
  x = _relu(bn(ops.conv2d(x, p["conv"]["w"], kernels="xla"), p["conv"]["bn"]))
  h = jnp.mean(x, axis=(1, 2))
  return (h @ p["fc"]["w"].astype(h.dtype)).astype(jnp.float32)


def _calib_plan(in_shapes, C):
  """What calibrates each input: ``(x_kind, y_kind)`` with x in {None, "fr",
  "conv"}, y in {None, "conv"}. ``in_shapes``: ``[(channels, scale), ...]``
  where ``scale`` counts the reductions so far."""
  (c0, r0), (c1, r1) = in_shapes
  if r0 != r1:
    if r1 != r0 + 1:
      raise AssertionError(f"input 0 at scale {r0}, input 1 at {r1}")
    kx = "fr"
  else:
    kx = "conv" if c0 != C else None
  return kx, ("conv" if c1 != C else None)


def _init_calib(key, in_shapes, C):
  kx, ky = _calib_plan(in_shapes, C)
  k1, k2 = jax.random.split(key)
  p, s = {}, {}
  if kx == "fr":
    p["calib_x"], s["calib_x"] = _init_fr(k1, in_shapes[0][0], C)
  elif kx == "conv":
    p["calib_x"], s["calib_x"] = _init_conv_bn(k1, in_shapes[0][0], C)
  if ky == "conv":
    p["calib_y"], s["calib_y"] = _init_conv_bn(k2, in_shapes[1][0], C)
  return p, s


@ops.scoped("calibrate")
def _calibrate(p, s, layers, cfg, train, new_s):
  """Brings both inputs to C channels at input 1's resolution (writes the
  calibration BN statistics into ``new_s``)."""
  x, y = layers
  if "calib_x" in p:
    if "w1" in p["calib_x"]:
      x, new_s["calib_x"] = _fr_bn(p["calib_x"], s["calib_x"], x, cfg, train, relu=True)
    else:
      x, new_s["calib_x"] = _conv_bn(p["calib_x"], s["calib_x"], x, cfg, train)
  if "calib_y" in p:
    y, new_s["calib_y"] = _conv_bn(p["calib_y"], s["calib_y"], y, cfg, train)
  return x, y


def _check_images(images, cfg):
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"cifar_micro child: images must be [N, H, W, 3], got {images.shape}.")
  if images.shape[1] % 4 or images.shape[2] % 4:
    raise ValueError(f"cifar_micro child: image height and width must be multiples of 4 (two "
                     f"reductions), got {images.shape[1:3]}.")


def _split_arc(arc, cfg):
  L = 4 * cfg.num_nodes
  return arc[:L], arc[L:]


def _codec(cfg):
  return cifar_micro.MicroCodec(cfg.num_nodes)


def _static_loose(cell_arc, num_nodes) -> list[int]:
  """Loose ends of one cell (inputs 0/1 included), as Python ints."""
  used = set(np.asarray(cell_arc)[0::2].tolist())
  return [j for j in range(num_nodes + 2) if j not in used]


def drop_path_keep(cell_idx: int, progress, cfg: MicroChildConfig):
  """The original's drop-path keep probability of cell ``cell_idx`` at
  ``progress = (global_step + 1) / (num_epochs * num_train_batches)``."""
  keep_layer = 1.0 - (cell_idx + 1) / cfg.num_cells * (1.0 - cfg.drop_path_keep_prob)
  return 1.0 - jnp.minimum(1.0, jnp.asarray(progress, jnp.float32)) * (1.0 - keep_layer)


def without_aux(params):
  """``params`` without the auxiliary head (``params["aux"]``), if it has one:
  the original's trainable, L2-decayed weights."""
  if isinstance(params, dict) and "aux" in params:
    return {k: v for k, v in params.items() if k != "aux"}
  return params


def count_params(params, exclude_aux: bool = False) -> int:
  """Number of parameters; ``exclude_aux`` leaves out ``params["aux"]`` (the
  original's "trainable" count; the aux head alone: ``count_params(params["aux"])``)."""
  return base.count_params(without_aux(params) if exclude_aux else params)


# ------------------------------------------------------------------ shared child
def _init_shared_node(key, b, C):
  """Node ``b``'s sep weights: per op, tables ``[2 (input x, y), b + 2 (input
  index), 2 (stack), ...]``. One array per weight kind, not one per (input,
  stack): every tensor is a gather, a gradient scatter and optimizer work that
  XLA compiles as its own kernels, so fewer tensors compile faster."""
  n_in = b + 2  # the original's num_possible_inputs: weights per input index
  out = {}
  for name, k, kn in zip(("sep3", "sep5"), SEP_KERNELS, jax.random.split(key)):
    kd, kp = jax.random.split(kn)
    out[name] = {
        "w_depth": ops.he_normal(kd, (2, n_in, 2, k, k, C), fan_in=n_in),
        "w_point": ops.he_normal(kp, (2, n_in, 2, C, C), fan_in=n_in),
        "bn": {"scale": jnp.ones((2, n_in, 2, C), jnp.float32),
               "offset": jnp.zeros((2, n_in, 2, C), jnp.float32)}}
  return out


def init_shared(key: jax.Array, cfg: MicroChildConfig):
  """Shared weights and moving statistics of the search child: ``(params, batch_stats)``.

  ``params["cells"][i]``: ``reduce`` (reduction cells), ``calib_x`` /
  ``calib_y`` (where needed), ``nodes[b]`` (graph node ``b + 2``) ``{"sep3",
  "sep5"}`` each ``{"w_depth": [2, b+2, 2, k, k, C], "w_point": [2, b+2, 2, C,
  C], "bn": [2, b+2, 2, C]}`` indexed ``[input (x, y), input index, stack]``,
  and ``final`` (``w [B+2, C, C]`` + BN). ``batch_stats`` mirrors the BNs with
  moving averages (stem, reductions, calibrations, ``final``)."""
  B, C = cfg.num_nodes, cfg.out_filters
  keys = jax.random.split(key, cfg.num_cells + 3)
  params, stats = {}, {}
  params["stem"], stats["stem"] = _init_stem(keys[0], cfg)
  layers = [(3 * C, 0), (3 * C, 0)]  # (channels, number of reductions so far)
  cells_p, cells_s = [], []
  aux = None
  for i in range(cfg.num_cells):
    kc = jax.random.split(keys[i + 1], 4)
    p, s = {}, {}
    if i in cfg.reduction_cells:
      C *= 2
      prev = layers[-1]
      p["reduce"], s["reduce"] = _init_fr(kc[0], prev[0], C)
      layers = [prev, (C, prev[1] + 1)]
    cp, cs = _init_calib(kc[1], layers, C)
    p.update(cp)
    s.update(cs)
    kn = jax.random.split(kc[2], B)
    p["nodes"] = [_init_shared_node(kn[b], b, C) for b in range(B)]
    p["final"] = {"w": ops.he_normal(kc[3], (B + 2, C, C), fan_in=B + 2),
                  "bn": ops.bn_params(C)}
    s["final"] = ops.bn_stats(C)
    cells_p.append(p)
    cells_s.append(s)
    layers = [layers[-1], (C, layers[1][1])]
    if i == cfg.aux_cell and cfg.use_aux_heads:
      aux = _init_aux(keys[-2], C, cfg)
  params["cells"], stats["cells"] = cells_p, cells_s
  params["fc"] = _init_head(keys[-1], C, cfg)
  if aux is not None:
    params["aux"] = aux
  return params, stats


def _index(t, i, static):
  return t[int(i)] if static else jax.lax.dynamic_index_in_dim(t, i, 0, keepdims=False)


@ops.scoped("pick_node")
def _pick_node(nodes, buf, i, static):
  """Node ``i``: Python indexing for a baked arc, else a dynamic index into the
  buffer of the earlier nodes (a chain of ``jnp.where`` measured no faster)."""
  if static:
    return nodes[int(i)]
  return jax.lax.dynamic_index_in_dim(buf, i, 0, keepdims=False)


def _sep_stack(x, st, cfg, train, stride=1, stats=None):
  """ReLU -> depthwise k x k -> pointwise -> BN (one stack of a sep conv)."""
  # conv_ops.separable_conv2d with the pointwise step as a 2-D matrix product.
  y = _conv1x1(ops.depthwise_conv2d(x, st["w_depth"], stride, kernels=cfg.kernels,
                                    relu_input=True), st["w_point"])
  return ops.batch_norm(y, st["bn"], stats, train=train, kernels=cfg.kernels,
                        decay=cfg.bn_decay, eps=cfg.bn_eps)


def _shared_branches(cfg):
  """The five ops of a search node; operand ``(x, {"sep3": stacks, "sep5": stacks})``
  with the weights already picked for the input index."""
  def sep(name):
    def f(operand):
      x, w = operand
      for st in w[name]:
        x, _ = _sep_stack(x, st, cfg, True)
      return x
    return f
  return [sep("sep3"), sep("sep5"),
          lambda op: ops.avg_pool(op[0], 3, 1, kernels=cfg.kernels),
          lambda op: ops.max_pool(op[0], 3, 1, kernels=cfg.kernels),
          lambda op: op[0]]


def _pick_weights(p_nodes, cell_arc, static):
  """``[[w_x, w_y] per node]``: each branch's sep weights picked for its input
  index, as ``{"sep3": [stack 0, stack 1], "sep5": [...]}``."""
  def pick(nd, side, i):
    rows = {name: jax.tree.map(lambda a: _index(a[side], i, static), nd[name])
            for name in ("sep3", "sep5")}
    return {name: [jax.tree.map(lambda a, j=j: a[j], w) for j in range(2)]
            for name, w in rows.items()}
  with jax.named_scope("pick_weights"):
    return [[pick(nd, side, cell_arc[4 * b + 2 * side]) for side in (0, 1)]
            for b, nd in enumerate(p_nodes)]


def _shared_core(p, s_final, x0, x1, cell_arc, cfg, static):
  """A search cell after its calibration: nodes, combination and final BN on the
  calibrated inputs. ``p``: the cell's ``nodes`` and ``final``. Returns (output
  [N,H,W,C], new ``final`` statistics)."""
  ws = _pick_weights(p["nodes"], cell_arc, static)
  w_final = p["final"]["w"].astype(x0.dtype)
  if static or not cfg.checkpoint_branches or not kernel_sets.get(cfg.kernels).CELL_VJP:
    y = _autodiff_cell(x0, x1, ws, w_final, cell_arc, cfg, static)
  else:
    y = _traced_cell(x0, x1, ws, w_final, cell_arc, cfg)
  return ops.batch_norm(y, p["final"]["bn"], s_final, train=True, kernels=cfg.kernels,
                        decay=cfg.bn_decay, eps=cfg.bn_eps)


def _shared_groups(params, cfg, scan):
  """Runs of consecutive search cells whose cores :func:`apply_shared` scans
  together. A run starts at any cell and goes on with the cells without
  reduction or calibration (their calibrated inputs are the previous cell's
  calibrated newer input and its output: the scan's carry); its second cell
  may also calibrate its older input, which is known before the run (stage 0:
  cell 1 calibrates the stem). One cell per run without ``scan``."""
  groups = []
  for i, p in enumerate(params["cells"]):
    extra = {k for k in ("reduce", "calib_x", "calib_y") if k in p}
    if scan and groups and (not extra or (extra == {"calib_x"} and len(groups[-1]) == 1)):
      groups[-1].append(i)
    else:
      groups.append([i])
  return groups


def _autodiff_cell(x0, x1, ws, w_final, cell_arc, cfg, static):
  """A cell's nodes and combination before its BN, differentiated by JAX: the
  baked arc (direct op calls, under the same per-op checkpoint as the traced
  path when ``checkpoint_branches``), or a traced arc with a kernel set without
  its own cell VJP (each switch branch recomputed by the set's switch with
  ``checkpoint_branches``) or with ``checkpoint_branches = False`` (autodiff
  through ``lax.switch``/the mask, no recomputation)."""
  B = cfg.num_nodes
  branches = _shared_branches(cfg)
  if static and cfg.checkpoint_branches:
    branches = [jax.checkpoint(f) for f in branches]
  nodes = [x0, x1]
  # Traced arc: the pickable nodes live in one [B + 1, N, H, W, C] buffer, written in
  # place as they are computed; a node's input is a dynamic slice of it.
  buf = None if static else jnp.concatenate(
      [x0[None], x1[None], jnp.zeros((B - 1,) + x0.shape, x0.dtype)])
  for b in range(B):
    outs = []
    for t in (0, 1):
      idx, op = cell_arc[4 * b + 2 * t], cell_arc[4 * b + 2 * t + 1]
      h = _pick_node(nodes, buf, idx, static)
      outs.append(ops.select_branch(op, branches, (h, ws[b][t]), mode=cfg.op_select,
                                    kernels=cfg.kernels,
                                    checkpoint=cfg.checkpoint_branches and not static))
    nodes.append(outs[0] + outs[1])
    if not static and b + 1 < B:
      with jax.named_scope("node_write"):
        buf = jax.lax.dynamic_update_index_in_dim(buf, nodes[-1], b + 2, 0)
  with jax.named_scope("combine"):
    return _combine(nodes, cell_arc, w_final, B, static)


# The search cell with a traced arc and checkpoint_branches (the default): one
# custom VJP per cell. The forward runs the B nodes as a lax.scan over one
# [B + 2, N, H, W, C] node buffer and saves only that buffer (and the picked
# weights); the backward pulls the output gradient back through the loose ends,
# then scans the branches in reverse, recomputing each taken op from its input
# slice and adding its input gradient into a gradient buffer of the same shape.
# Why not JAX's autodiff of the same forward: it saves a copy of every branch
# input and copies the whole gradient buffer per branch, and compiles the cell
# once per branch instead of once (docs/performance.md, CIFAR-10 section).


def _loose_mask(cell_arc, B):
  """[B + 2] bool: the nodes (inputs 0/1 included) that no node of the cell reads."""
  used = jnp.zeros((B + 2,), jnp.int32)
  for t in range(0, 4 * B, 2):
    used = used + jax.nn.one_hot(cell_arc[t], B + 2, dtype=jnp.int32)
  return used == 0


def _branch_steps(ws, cell_arc):
  """The cell's 2B branches as scan inputs: (picked weights stacked [2B, ...],
  input index, op), in arc order (node 0 x, node 0 y, node 1 x, ...)."""
  w = jax.tree.map(lambda *a: jnp.stack(a), *[w for pair in ws for w in pair])
  return w, cell_arc[0::2], cell_arc[1::2]


def _slot(buf, i):
  return jax.lax.dynamic_index_in_dim(buf, i, 0, keepdims=False)


def _add_to_slot(buf, i, x):
  return jax.lax.dynamic_update_index_in_dim(buf, _slot(buf, i) + x, i, 0)


def _rows(x):
  return x.reshape(-1, x.shape[-1])


def _cell_forward(x0, x1, ws, w_final, cell_arc, cfg):
  """(pre-BN cell output, node buffer [B + 2, N, H, W, C])."""
  B = cfg.num_nodes
  run = [lambda op, f=f: f((_slot(op[0], op[1]), op[2])) for f in _shared_branches(cfg)]
  buf = jnp.concatenate([x0[None], x1[None], jnp.zeros((B,) + x0.shape, x0.dtype)])

  # One branch per step, as in the backward pass: the scan body holds ONE op
  # switch, so XLA compiles each op once per cell, not once per input of a
  # node (compile time: docs/performance.md). A node's first branch writes its
  # slot, the second adds to it: ``x + y`` as before, the same numbers.
  def branch_step(buf, step):
    (w, idx, op), node, first = step
    y = ops.select_branch(op, run, (buf, idx, w), mode=cfg.op_select, kernels=cfg.kernels,
                          checkpoint=False)
    with jax.named_scope("node_write"):
      y = jnp.where(first, y, _slot(buf, node) + y)
      return jax.lax.dynamic_update_index_in_dim(buf, y, node, 0), None

  node = jnp.repeat(jnp.arange(2, B + 2), 2)
  first = jnp.tile(jnp.asarray([True, False]), B)
  buf, _ = jax.lax.scan(branch_step, buf, (_branch_steps(ws, cell_arc), node, first))

  def loose_end(acc, step):
    j, loose, w = step
    return jax.lax.cond(loose, lambda a: a + _rows(_relu(_slot(buf, j))) @ w,
                        lambda a: a, acc), None

  with jax.named_scope("combine"):
    # Starts from input 0's term (or zeros): a zero constant as the scan's
    # start would be shared by the cells, copied once per cell and scheduled
    # early by XLA (see _traced_cell_bwd).
    loose = _loose_mask(cell_arc, B)
    acc = jnp.where(loose[0], _rows(_relu(x0)) @ w_final[0], 0.0)
    acc, _ = jax.lax.scan(loose_end, acc, (jnp.arange(1, B + 2), loose[1:], w_final[1:]))
  return acc.reshape(x0.shape[:-1] + w_final.shape[-1:]), buf


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _traced_cell(x0, x1, ws, w_final, cell_arc, cfg):
  """The search cell's nodes and combination before its BN (traced arc)."""
  return _cell_forward(x0, x1, ws, w_final, cell_arc, cfg)[0]


def _traced_cell_fwd(x0, x1, ws, w_final, cell_arc, cfg):
  y, buf = _cell_forward(x0, x1, ws, w_final, cell_arc, cfg)
  return y, (buf, ws, w_final, cell_arc)


def _traced_cell_bwd(cfg, res, d_y):
  buf, ws, w_final, cell_arc = res
  B = cfg.num_nodes
  g = _rows(d_y)

  def loose_grads(j, loose, w):
    def grads(_):
      n = _slot(buf, j)
      return (jnp.where(n > 0, (g @ w.T).reshape(n.shape), 0.0), _rows(_relu(n)).T @ g)
    def zeros(_):
      return jnp.zeros(buf.shape[1:], buf.dtype), jnp.zeros_like(w)
    return jax.lax.cond(loose, grads, zeros, None)

  def loose_end(d_buf, step):
    j, loose, w = step
    d_n, d_w = loose_grads(j, loose, w)
    return jax.lax.dynamic_update_index_in_dim(d_buf, d_n, j, 0), d_w

  with jax.named_scope("combine"):
    # The gradient buffer starts as node 0's gradient and zeros (one fusion
    # that needs this cell's gradient), then the scan writes nodes 1..B+1 in
    # place. Not a scan's stacked output: those start from a zero constant
    # that XLA shares between the cells (a copy per cell) and schedules early,
    # keeping them alive from the forward pass on.
    loose = _loose_mask(cell_arc, B)
    d_0, d_w_0 = loose_grads(0, loose[0], w_final[0])
    d_buf = jnp.concatenate([d_0[None], jnp.zeros((B + 1,) + d_0.shape, d_0.dtype)])
    d_buf, d_w_rest = jax.lax.scan(loose_end, d_buf,
                                   (jnp.arange(1, B + 2), loose[1:], w_final[1:]))
    d_w_final = jnp.concatenate([d_w_0[None], d_w_rest])

  def pullback(f):
    def run(op):
      idx, w, d_buf, node = op
      return jax.vjp(lambda h, w: f((h, w)), _slot(buf, idx), w)[1](_slot(d_buf, node))
    return run

  pullbacks = [pullback(f) for f in _shared_branches(cfg)]

  def branch(d_buf, step):
    (w, idx, op), node = step
    d_h, d_w = ops.select_branch(op, pullbacks, (idx, w, d_buf, node),
                                 mode=cfg.op_select, kernels=cfg.kernels, checkpoint=False)
    with jax.named_scope("grad_write"):
      return _add_to_slot(d_buf, idx, d_h), d_w

  node = jnp.repeat(jnp.arange(2, B + 2), 2)  # the node each branch belongs to
  d_buf, d_w = jax.lax.scan(branch, d_buf, (_branch_steps(ws, cell_arc), node), reverse=True)
  d_ws = [[jax.tree.map(lambda a, i=2 * b + t: a[i], d_w) for t in (0, 1)] for b in range(B)]
  return d_buf[0], d_buf[1], d_ws, d_w_final, None


_traced_cell.defvjp(_traced_cell_fwd, _traced_cell_bwd)


def _combine(nodes, cell_arc, w_final, B, static):
  """The cell output before its BN: concat of the loose ends -> ReLU -> 1x1."""
  C = w_final.shape[-1]
  if static:
    loose = _static_loose(cell_arc, B)
    cat = jnp.concatenate([_relu(nodes[j]) for j in loose], axis=-1)
    return _conv1x1(cat, w_final[np.asarray(loose)].reshape(len(loose) * C, C))
  loose = _loose_mask(cell_arc, B)
  # Not-loose nodes get a zero weight block: concat of loose ends -> 1x1 with
  # the gathered [k C, C] weights, at a fixed shape.
  w = jnp.where(loose[:, None, None], w_final, 0.0).reshape((B + 2) * C, C)
  cat = jnp.concatenate([_relu(n) for n in nodes], axis=-1)
  return _conv1x1(cat, w)


def apply_shared(params, batch_stats, arc, images_NHWC, *, train: bool, key, cfg):
  """The weight-shared child on one arc: ``(logits, aux_logits | None, new_batch_stats)``.

  ``arc``: a traced/jax int array (one compilation for all arcs), or a numpy
  array to bake the arc in (validated). BNs always use batch statistics (search
  semantics, see the module docstring); ``train`` switches the head dropout
  (needs ``key``) and the aux logits.
  """
  _check_images(images_NHWC, cfg)
  static = isinstance(arc, np.ndarray)
  arc = _codec(cfg).validate(arc) if static else jnp.asarray(arc, jnp.int32)
  normal_arc, reduce_arc = _split_arc(arc, cfg)
  new_stats = {}
  x, new_stats["stem"] = _stem(params["stem"], batch_stats["stem"], images_NHWC, cfg, True)
  layers = [x, x]
  aux_logits = None
  want_aux = "aux" in params and train
  new_cells = []
  for group in _shared_groups(params, cfg, cfg.scan_layers and not static):
    i = group[0]
    p, s = params["cells"][i], batch_stats["cells"][i]
    ns = dict(s)
    if i in cfg.reduction_cells:
      prev = layers[-1]
      xr, ns["reduce"] = _fr_bn(p["reduce"], s["reduce"], prev, cfg, True)
      layers = [prev, xr]
    x0, x1 = _calibrate(p, s, layers, cfg, True, ns)
    arcs = [reduce_arc if j in cfg.reduction_cells else normal_arc for j in group]
    if len(group) == 1:
      x, ns["final"] = _shared_core(p, s["final"], x0, x1, arcs[0], cfg, static)
      new_cells.append(ns)
      layers = [layers[-1], x]
      if i == cfg.aux_cell and want_aux:
        aux_logits = _aux_head(params["aux"], x, cfg)
      continue
    # Cores of identical shapes: one lax.scan over their weights, stacked here
    # in the step (the parameter layout stays one entry per cell), so that XLA
    # compiles the cell once per run instead of once per cell.
    aux_k = group.index(cfg.aux_cell) if cfg.aux_cell in group and want_aux else None
    ns_1 = dict(batch_stats["cells"][group[1]])
    # The second cell's older input, calibrated before the run (or None).
    older_1 = _calibrate(params["cells"][group[1]], batch_stats["cells"][group[1]],
                         [layers[-1], x1], cfg, True, ns_1)[0] \
        if "calib_x" in params["cells"][group[1]] else None
    core = lambda j: {"nodes": params["cells"][j]["nodes"], "final": params["cells"][j]["final"]}
    xs = (jax.tree.map(lambda *a: jnp.stack(a), *[core(j) for j in group]),
          jax.tree.map(lambda *a: jnp.stack(a), *[batch_stats["cells"][j]["final"]
                                                  for j in group]),
          jnp.stack(arcs))

    def body(carry, step):
      (pc, sf, cell_arc), k = step
      y, nsf = _shared_core(pc, sf, carry[0], carry[1], cell_arc, cfg, False)
      older = carry[1] if carry[2] is None else jnp.where(k == 0, carry[2], carry[1])
      return (older, y, carry[2]), (nsf, y if aux_k is not None else None)

    (older, x, _), (stacked, ys) = jax.lax.scan(
        body, (x0, x1, older_1), (xs, jnp.arange(len(group))))
    for k, j in enumerate(group):
      c = ns if k == 0 else ns_1 if k == 1 else dict(batch_stats["cells"][j])
      c["final"] = jax.tree.map(lambda a, k=k: a[k], stacked)
      new_cells.append(c)
    layers = [older, x]
    if aux_k is not None:
      aux_logits = _aux_head(params["aux"], ys[aux_k], cfg)
  new_stats["cells"] = new_cells
  logits = _head(params["fc"], x, cfg, train, key)
  return logits, aux_logits, new_stats


# ------------------------------------------------------------------- fixed child
def _fixed_plan(cfg, arc):
  """Static skeleton of a fixed child: per cell (C, reduction?, input shapes,
  loose ends); returns (cells, output shape of the last cell, aux input channels)."""
  arcs = _split_arc(arc, cfg)
  C = cfg.out_filters
  layers = [(3 * C, 0), (3 * C, 0)]
  plan = []
  aux_c = None
  for i in range(cfg.num_cells):
    red = i in cfg.reduction_cells
    if red:
      C *= 2
    cell_arc = arcs[1] if red else arcs[0]
    loose = _static_loose(cell_arc, cfg.num_nodes)
    plan.append({"C": C, "reduction": red, "inputs": list(layers), "arc": cell_arc,
                 "loose": loose})
    out = (len(loose) * C, layers[1][1] + (1 if red else 0))
    layers = [layers[-1], out]
    if i == cfg.aux_cell:
      aux_c = out[0]
  return plan, layers[-1], aux_c


def _init_fixed_op(key, op, C, strided):
  if op in (0, 1):
    k = SEP_KERNELS[op]
    stacks = []
    for kk in jax.random.split(key, 2):
      kd, kp = jax.random.split(kk)
      stacks.append({"w_depth": ops.he_normal(kd, (k, k, C), fan_in=k * k * C),
                     "w_point": ops.he_normal(kp, (C, C), fan_in=C),
                     "bn": ops.bn_params(C)})
    return {"stacks": stacks}, {"stacks": [ops.bn_stats(C), ops.bn_stats(C)]}
  if op == 4 and strided:
    p, s = _init_fr(key, C, C)
    return {"fr": p}, {"fr": s}
  return {}, {}


def init_fixed(key: jax.Array, cfg: MicroChildConfig, arc):
  """Parameters and moving statistics of the fixed child of ``arc`` (numpy,
  validated): ``(params, batch_stats)``.

  Per cell: calibrations, ``base`` (ReLU -> 1x1 -> BN on input 1), per node
  and branch (``nodes[b]["x"|"y"]``) the op's parameters: sep ops ``{"stacks":
  [{"w_depth": [k,k,C], "w_point": [C,C], "bn"}] * 2}`` (the first stack
  carries the stride), ``{}`` for pools and identity, ``{"fr"}`` for a strided
  identity; ``combine[str(j)]``: an FR for each loose input ``j < 2`` of a
  reduction cell."""
  arc = _codec(cfg).validate(arc)
  B = cfg.num_nodes
  plan, (c_last, _), aux_c = _fixed_plan(cfg, arc)
  keys = jax.random.split(key, cfg.num_cells + 3)
  params, stats = {}, {}
  params["stem"], stats["stem"] = _init_stem(keys[0], cfg)
  cells_p, cells_s = [], []
  for i, cell in enumerate(plan):
    C, red, cell_arc = cell["C"], cell["reduction"], cell["arc"]
    kc = jax.random.split(keys[i + 1], 4)
    p, s = _init_calib(kc[0], cell["inputs"], C)
    p["base"], s["base"] = _init_conv_bn(kc[1], C, C)
    kn = jax.random.split(kc[2], 2 * B)
    p["nodes"], s["nodes"] = [], []
    for b in range(B):
      np_, ns_ = {}, {}
      for t, name in ((0, "x"), (2, "y")):
        idx, op = int(cell_arc[4 * b + t]), int(cell_arc[4 * b + t + 1])
        np_[name], ns_[name] = _init_fixed_op(kn[2 * b + t // 2], op, C, red and idx < 2)
      p["nodes"].append(np_)
      s["nodes"].append(ns_)
    p["combine"], s["combine"] = {}, {}
    if red:
      kk = jax.random.split(kc[3], 2)
      for j in cell["loose"]:
        if j < 2:
          p["combine"][str(j)], s["combine"][str(j)] = _init_fr(kk[j], C, C)
    cells_p.append(p)
    cells_s.append(s)
  params["cells"], stats["cells"] = cells_p, cells_s
  params["fc"] = _init_head(keys[-1], c_last, cfg)
  if cfg.use_aux_heads:
    params["aux"] = _init_aux(keys[-2], aux_c, cfg)
  return params, stats


def _drop_path(x, keep, u):
  """Keeps example ``n`` of ``x`` (scaled by ``1 / keep``) where ``u[n] < keep``
  (``u`` uniform in [0, 1): a Bernoulli(keep) mask per example)."""
  return jnp.where((u < keep)[:, None, None, None], x / jnp.asarray(keep, x.dtype), 0.0)


def _fixed_op(p, s, x, op, stride, cfg, train):
  """Returns (y, new op statistics)."""
  if op in (0, 1):
    new = []
    for k, (st, ss) in enumerate(zip(p["stacks"], s["stacks"])):
      x, ns = _sep_stack(x, st, cfg, train, stride if k == 0 else 1, ss)
      new.append(ns)
    return x, {"stacks": new}
  if op == 2:
    return ops.avg_pool(x, 3, stride, kernels=cfg.kernels), s
  if op == 3:
    return ops.max_pool(x, 3, stride, kernels=cfg.kernels), s
  if stride > 1:
    y, ns = _fr_bn(p["fr"], s["fr"], x, cfg, train)
    return y, {"fr": ns}
  return x, s


def _fixed_cell(diff, extra, *, cell, cfg, train):
  """Cell ``i`` of the fixed child: ``(output, new statistics)``. ``keep`` and
  ``key``: the drop-path keep probability and the network's drop-path key (both
  None without drop-path); ``i`` (int or traced int32) seeds the cell's masks."""
  (p, s, x_older, x_newer), (keep, key, i) = diff, extra
  red, cell_arc = cell["reduction"], cell["arc"]
  ns = {}
  x0, x1 = _calibrate(p, s, [x_older, x_newer], cfg, train, ns)
  x1, ns["base"] = _conv_bn(p["base"], s["base"], x1, cfg, train)
  nodes = [x0, x1]
  if keep is not None:
    # One draw per cell for all its branches' masks ([B, 2, N]): a threefry
    # hash per branch is many compiled instructions (docs/performance.md).
    u = jax.random.uniform(jax.random.fold_in(key, i), (cfg.num_nodes, 2, x1.shape[0]))
  ns["nodes"] = []
  for b in range(cfg.num_nodes):
    outs, nsb = [], {}
    for t, name in ((0, "x"), (2, "y")):
      idx, op = int(cell_arc[4 * b + t]), int(cell_arc[4 * b + t + 1])
      stride = 2 if red and idx < 2 else 1
      y, nsb[name] = _fixed_op(p["nodes"][b][name], s["nodes"][b][name], nodes[idx], op,
                               stride, cfg, train)
      if keep is not None and op < 4:
        y = _drop_path(y, keep, u[b, t // 2])
      outs.append(y)
    ns["nodes"].append(nsb)
    nodes.append(outs[0] + outs[1])
  ns["combine"] = {}
  parts = []
  for j in cell["loose"]:
    if red and j < 2:
      y, ns["combine"][str(j)] = _fr_bn(p["combine"][str(j)], s["combine"][str(j)],
                                        nodes[j], cfg, train)
      parts.append(y)
    else:
      parts.append(nodes[j])
  return (parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)), ns


def apply_fixed(params, batch_stats, arc, images_NHWC, *, train: bool, key, cfg,
                progress=0.0):
  """The fixed child of ``arc`` (numpy): ``(logits, aux_logits | None, new_batch_stats)``.

  ``train``: batch statistics (moving averages updated), drop-path and head
  dropout (needs ``key``); otherwise moving averages and no randomness.
  ``progress`` (may be traced): ``(global_step + 1) / (num_epochs *
  num_train_batches)``, the drop-path schedule's clock.
  """
  _check_images(images_NHWC, cfg)
  arc = _codec(cfg).validate(arc)
  plan, _, _ = _fixed_plan(cfg, arc)
  use_dp = train and cfg.drop_path_keep_prob < 1.0
  if train:
    k_head, k_dp = jax.random.split(key)
  new_stats = {}
  x, new_stats["stem"] = _stem(params["stem"], batch_stats["stem"], images_NHWC, cfg, train)
  layers = [x, x]
  aux_logits = None
  new_cells = []
  for group in _fixed_groups(plan, params, batch_stats, cfg):
    i, cell = group[0], plan[group[0]]
    run = functools.partial(_fixed_cell, cell=cell, cfg=cfg, train=train)
    if cfg.remat == "cells" and train:
      # Saves only the cell's inputs; its activations are recomputed in the
      # backward pass.
      run = remat.recompute_in_backward(run, cfg.kernels)
    keeps = [drop_path_keep(j, progress, cfg) if use_dp else None for j in group]
    if len(group) == 1:
      x, new_cell = run((params["cells"][i], batch_stats["cells"][i], layers[0], layers[1]),
                        (keeps[0], k_dp if use_dp else None, i))
      new_cells.append(new_cell)
      layers = [layers[-1], x]
    else:
      # Cells of identical shapes: one lax.scan over their stacked weights, so
      # that XLA compiles the cell once (the weights are stacked here, in the
      # step: the parameter layout stays one entry per cell).
      stack = lambda *a: jnp.stack(a)
      xs = (jax.tree.map(stack, *[params["cells"][j] for j in group]),
            jax.tree.map(stack, *[batch_stats["cells"][j] for j in group]),
            jnp.stack(keeps) if use_dp else None,
            jnp.asarray(group, jnp.int32))

      def body(carry, step, run=run):
        p, s, keep, j = step
        y, ns = run((p, s, carry[0], carry[1]), (keep, k_dp if use_dp else None, j))
        return (carry[1], y), ns

      (older, x), stacked = jax.lax.scan(body, (layers[0], layers[1]), xs)
      new_cells.extend(jax.tree.map(lambda a, k=k: a[k], stacked) for k in range(len(group)))
      layers = [older, x]
    if group[-1] == cfg.aux_cell and "aux" in params and train:
      aux_logits = _aux_head(params["aux"], x, cfg)
  new_stats["cells"] = new_cells
  logits = _head(params["fc"], x, cfg, train, k_head if train else None)
  return logits, aux_logits, new_stats


def _fixed_groups(plan, params, batch_stats, cfg):
  """Runs of consecutive cells that :func:`apply_fixed` scans together: same
  plan (shapes, arc, loose ends) and same parameter shapes; the aux head's
  cell ends a run. One run per cell when ``cfg.scan_layers`` is off."""
  def sig(i):
    c = plan[i]
    shapes = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)),
                          (params["cells"][i], batch_stats["cells"][i]))
    return (c["C"], c["reduction"], tuple(c["inputs"]), tuple(np.asarray(c["arc"]).tolist()),
            tuple(c["loose"]), jax.tree.structure(shapes), tuple(jax.tree.leaves(shapes)))
  groups = []
  for i in range(len(plan)):
    if (cfg.scan_layers and groups and groups[-1][-1] != cfg.aux_cell
        and sig(groups[-1][-1]) == sig(i)):
      groups[-1].append(i)
    else:
      groups.append([i])
  return groups


__all__ = [
  "MicroChildConfig",
  "apply_fixed",
  "apply_shared",
  "count_params",
  "drop_path_keep",
  "init_fixed",
  "init_shared",
  "without_aux",
]
