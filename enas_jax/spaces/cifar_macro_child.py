"""Child networks of the CIFAR-10 macro space: the weight-shared one and the fixed one.

Both are plain pytrees plus pure functions.
Tensor names carry their layout: ``x_NHWC`` activations, ``w_HWIO`` k x k
kernels, ``w_IO`` 1x1 kernels stored as matrices, ``w_depth_HWC`` depthwise
kernels, ``w_CK`` the classifier. Every batch norm (BN) has learned
``{"scale", "offset"}`` in ``params`` and moving ``{"mean", "var"}`` in
``batch_stats``, at the same path.

Skeleton (both children). A stem (3x3 conv 3 -> C, BN, no ReLU) is
``layers[0]``; layer ``l`` reads the last entry of the list and appends its
output. Skip bit ``j`` of layer ``l`` (``l`` bits) refers to ``[stem, L_0, ...,
L_{l-2}][j]``: the immediate predecessor is always the input, never a skip
candidate (so bit ``j`` names layer ``j-1``, off by one from the controller's
anchors, exactly as in the original). With ``pd = L // 3``, after layers
``pd-1`` and ``2pd-1`` every tensor in the list (stem included) is replaced by
its own factorized reduction (``conv_ops.factorized_reduce`` + BN, separate
weights per tensor). Head: global average pool (no ReLU before it), dropout
with ``keep_prob`` in training, FC ``[C, num_classes]`` without bias.

Shared child (search), ``C`` constant throughout (not doubled)::

  params = {"stem": {"w_HWIO", "bn"},
            "layers": ({"branches": (b0, ..., b5), "skip_bn"  (l > 0)}, ...),
            "reduce": (({"w1_IO", "w2_IO", "bn"}, ...per list tensor), ...per reduction),
            "fc": {"w_CK"}}
  b0/b2 conv kxk: {"w_in_IO", "bn_in", "w_HWIO", "bn_out"}   1x1-BN-ReLU-kxk-BN-ReLU
  b1/b3 sep kxk:  {"w_in_IO", "bn_in", "w_depth_HWC", "w_point_IO", "bn_out"}
                  1x1-BN-ReLU-depthwise-pointwise-BN(eps sep_bn_eps = 1e-3)-ReLU
  b4/b5 pools:    {"w_in_IO", "bn_in"}   1x1-BN-ReLU-3x3 avg/max pool (stride 1)

``batch_stats`` mirrors every ``bn*`` entry. Every layer owns all six branches.
For ``l > 0`` the layer output is ``BN(op_out + sum_{bit_j = 1} layers[j])``.

*The sampled op is used.* The original's search child always ran the max-pool
branch, whatever the controller sampled (a Python late-binding bug in its
``tf.case``); that bug is not copied. The op is picked with
:func:`conv_ops.select_branch` (``lax.switch`` whose backward pass recomputes
the taken branch, or a ``jnp.where`` mask): every branch takes and returns the
layer's whole branch-statistics tuple and replaces only its own entries, so the
running statistics of unselected branches never move (under the mask too), and
unselected branches' parameters get exactly zero gradient. Skip bits enter as a
0/1 float mask (candidates are finite, so ``0 * x`` is an exact zero). A traced
``int32`` arc therefore gives one compilation for every arc.

With ``scan_layers`` (traced arcs), the layers of a stage after layer 0 run as
one ``lax.scan`` over their weights (stacked inside the step) and a fixed-size
buffer of the layer list, so that XLA compiles a layer once per stage instead
of once per layer; the same function and parameter layout.

When ``arc`` is a numpy array instead, the same :func:`apply_shared` builds only
the chosen branches and adds only the selected skips (the arc "baked in"): the
static network the benchmark compares against, and the tests' reference.

Fixed child (final training, with corrections), channels doubled at each
reduction (C -> 2C -> 4C; every list tensor reduced to the new width), only the
arc's ops have parameters::

  params = {"stem", "layers": ({"op": {...}, "skip": {"w_IO", "bn"} (l > 0)}, ...),
            "reduce", "fc"}
  ops 0/2 conv kxk: ReLU-1x1-BN-ReLU-kxk conv-BN (the original's order)
  ops 1/3 sep kxk:  ReLU-1x1-BN-ReLU-depthwise-pointwise-BN. The original built
                    these as *full* convolutions (issues #18, #56); here they are
                    true separable convolutions, as the paper describes. Their BN
                    uses ``bn_eps`` (the original's fixed layer has no masked BN).
  ops 4/5 pools:    ReLU-1x1-BN-ReLU-3x3 pool (stride 1). The original left them
                    unimplemented (``pass``: any arc with a pool crashed, #41); this
                    mirrors the search branch with the fixed layer's leading ReLU.
  skip (l > 0):     concat(selected skip sources in bit order, op output) -> ReLU
                    -> 1x1 conv ((n_skips + 1) C -> C) -> BN (always present for
                    l > 0, even with no bit set, as in the original).

Initialisation: He-normal (truncated, Keras) for every conv/FC weight with the
fan-in Keras computes from the original's TF shapes; for the depthwise kernel
that shape is ``[k, k, C, 1]``, so its fan-in is ``k*k*C`` (as the original),
not ``k*k``. BN scale 1, offset 0, moving mean 0, variance 1.

BN: ``train=True`` normalises with the batch statistics and moves the averages
(decay ``bn_decay``); ``train=False`` uses the moving averages (the macro
reward/valid graphs use ``train=False``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from enas_jax import backend, remat
from enas_jax.spaces import base, conv_ops
from enas_jax.spaces.cifar_macro import OP_NAMES, MacroCodec

IMAGE_CHANNELS = 3
NUM_OPS = len(OP_NAMES)
_KERNEL = {0: 3, 1: 3, 2: 5, 3: 5}  # ops 0-3: kernel size
_SEPARABLE = (1, 3)
_POOLS = {4: conv_ops.avg_pool, 5: conv_ops.max_pool}  # called with kernels=


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_num(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
      v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class MacroChildConfig(backend.ResolvedChild):
  """Static settings of a macro child (hashable: safe to close over in jit).

  ``kernels``, ``compute_dtype`` and ``op_select`` accept ``"auto"`` and are
  stored resolved by :func:`enas_jax.backend.resolve` for ``platform`` (the
  running backend when None; set to the target when compiling for another);
  ``scan_layers`` accepts ``"auto"`` too (:func:`enas_jax.backend.resolve_scan_layers`).
  """
  num_layers: int
  out_filters: int
  num_classes: int = 10
  keep_prob: float = 0.9
  bn_decay: float = 0.9
  bn_eps: float = 1e-5
  sep_bn_eps: float = 1e-3
  kernels: str = "auto"
  compute_dtype: str = "auto"
  op_select: str = "auto"
  platform: str | None = None
  checkpoint_branches: bool = True
  remat: str = "none"
  scan_layers: bool | str = "auto"

  def __post_init__(self):
    if not _is_int(self.num_layers) or self.num_layers < 1:
      raise ValueError(f"space.num_layers must be an integer >= 1, got {self.num_layers!r}.")
    if not _is_int(self.out_filters) or self.out_filters < 2 or self.out_filters % 2:
      raise ValueError(
          f"child.out_filters must be an even integer >= 2 (the factorized reduction "
          f"splits it in two halves), got {self.out_filters!r}.")
    if not _is_int(self.num_classes) or self.num_classes < 1:
      raise ValueError(f"child.num_classes must be an integer >= 1, got {self.num_classes!r}.")
    if not _is_num(self.keep_prob) or not 0.0 < self.keep_prob <= 1.0:
      raise ValueError(
          f"child.keep_prob is a keep probability in (0, 1], got {self.keep_prob!r}.")
    if not _is_num(self.bn_decay) or not 0.0 <= self.bn_decay < 1.0:
      raise ValueError(f"child.bn_decay must be in [0, 1), got {self.bn_decay!r}.")
    for name in ("bn_eps", "sep_bn_eps"):
      v = getattr(self, name)
      if not _is_num(v) or not v > 0.0:
        raise ValueError(f"child.{name} must be a number > 0, got {v!r}.")
    if not isinstance(self.checkpoint_branches, (bool, np.bool_)):
      raise ValueError(
          f"child.checkpoint_branches must be True or False, got {self.checkpoint_branches!r}.")
    if self.remat not in ("none", "layers"):
      raise ValueError(f"child.remat must be 'none' or 'layers' for the macro space, got "
                       f"{self.remat!r}.")
    object.__setattr__(self, "scan_layers",
                       backend.resolve_scan_layers(self.scan_layers, self.platform))
    self._resolve_impl()

  @classmethod
  def from_config(cls, config) -> MacroChildConfig:
    """From ``config.space.num_layers`` and ``config.child.*``."""
    c, s = config.child, config.space
    return cls(
        num_layers=s.num_layers, out_filters=c.out_filters,
        num_classes=c.get("num_classes", 10), keep_prob=c.get("keep_prob", 0.9),
        bn_decay=c.get("bn_decay", 0.9), bn_eps=c.get("bn_eps", 1e-5),
        sep_bn_eps=c.get("sep_bn_eps", 1e-3), op_select=c.get("op_select", "auto"),
        kernels=c.get("kernels", "auto"), compute_dtype=c.get("compute_dtype", "auto"),
        platform=c.get("platform", None),
        checkpoint_branches=c.get("checkpoint_branches", True),
        remat=c.get("remat", "none"), scan_layers=c.get("scan_layers", "auto"))

  @property
  def pool_layers(self) -> tuple[int, ...]:
    """Layers after which every list tensor is reduced: ``pd-1`` and ``2pd-1``,
    ``pd = L // 3`` ([3, 7] for 12 layers, [7, 15] for 24; none for L < 3)."""
    pd = self.num_layers // 3
    return tuple(l for l in (pd - 1, 2 * pd - 1) if l >= 0)


@functools.cache
def _codec(num_layers: int) -> MacroCodec:
  return MacroCodec(num_layers)


# ----------------------------------------------------------------- arc access
def _is_static_arc(arc) -> bool:
  return isinstance(arc, (np.ndarray, list, tuple))


def _split_arc(arc, cfg: MacroChildConfig):
  """Per layer ``(op, skip bits)``; numpy values for a static arc, traced
  scalars/vectors otherwise. Static arcs are validated; a traced arc can only be
  checked for shape and dtype (validate arcs before they reach the device)."""
  codec = _codec(cfg.num_layers)
  if _is_static_arc(arc):
    a = codec.validate(np.asarray(arc))
  else:
    a = jnp.asarray(arc)
    if a.shape != (codec.arc_length,) or not jnp.issubdtype(a.dtype, jnp.integer):
      raise ValueError(
          f"cifar_macro: a traced arc must be an integer array of shape "
          f"({codec.arc_length},) for {cfg.num_layers} layers, got {a.dtype}{list(a.shape)}.")
  ops, bits = [], []
  for l in range(cfg.num_layers):
    p = int(codec.op_positions[l])
    ops.append(a[p])
    bits.append(a[p + 1:p + 1 + l])
  return ops, bits


# --------------------------------------------------------------- small pieces
class _Keys:
  """Deterministic stream of keys: ``fold_in(key, 0), fold_in(key, 1), ...``."""

  def __init__(self, key):
    self.key, self.i = key, 0

  def __call__(self):
    self.i += 1
    return jax.random.fold_in(self.key, self.i - 1)


def _pointwise(x_NHWC, w_IO):
  return conv_ops.matmul_1x1(x_NHWC, w_IO)


def _bn(x_NHWC, p, s, *, train: bool, cfg: MacroChildConfig, eps: float | None = None):
  return conv_ops.batch_norm(x_NHWC, p, s, train=train, kernels=cfg.kernels,
                             decay=cfg.bn_decay, eps=cfg.bn_eps if eps is None else eps)


def _bn_pair(c: int):
  return conv_ops.bn_params(c), conv_ops.bn_stats(c)


def _init_stem(keys, c: int):
  bp, bs = _bn_pair(c)
  return ({"w_HWIO": conv_ops.he_normal(keys(), (3, 3, IMAGE_CHANNELS, c)), "bn": bp},
          {"bn": bs})


def _apply_stem(p, s, images_NHWC, *, train, cfg):
  x = conv_ops.conv2d(images_NHWC.astype(cfg.dtype), p["w_HWIO"], kernels=cfg.kernels)
  x, st = _bn(x, p["bn"], s["bn"], train=train, cfg=cfg)
  return x, {"bn": st}


def _init_reduce(keys, c_in: int, c_out: int):
  bp, bs = _bn_pair(c_out)
  return ({"w1_IO": conv_ops.he_normal(keys(), (c_in, c_out // 2)),
           "w2_IO": conv_ops.he_normal(keys(), (c_in, c_out // 2)), "bn": bp},
          {"bn": bs})


def _reduce_all(ps, ss, layers, *, train, cfg):
  """Every list tensor through its own factorized reduction + BN."""
  out, stats = [], []
  for p, s, x in zip(ps, ss, layers):
    y = conv_ops.factorized_reduce(x, p["w1_IO"], p["w2_IO"], 2)
    y, st = _bn(y, p["bn"], s["bn"], train=train, cfg=cfg)
    out.append(y)
    stats.append({"bn": st})
  return out, tuple(stats)


def _head(p, x_NHWC, *, train, key, cfg):
  h_NC = jnp.mean(x_NHWC, axis=(1, 2))
  if train and cfg.keep_prob < 1.0:
    if key is None:
      raise ValueError("apply: train=True with keep_prob < 1 needs a dropout `key`.")
    keep = jax.random.bernoulli(key, cfg.keep_prob, h_NC.shape)
    h_NC = jnp.where(keep, h_NC / cfg.keep_prob, 0.0)
  return (h_NC @ p["w_CK"].astype(h_NC.dtype)).astype(jnp.float32)


def _init_op(keys, op: int, c: int):
  """Parameters/statistics of one op (search branch or fixed op): C -> C."""
  bp_in, bs_in = _bn_pair(c)
  p = {"w_in_IO": conv_ops.he_normal(keys(), (c, c)), "bn_in": bp_in}
  s = {"bn_in": bs_in}
  if op in _KERNEL:
    k = _KERNEL[op]
    if op in _SEPARABLE:
      # Keras fan-in of the original's [k, k, C, 1] depthwise variable: k*k*C.
      p["w_depth_HWC"] = conv_ops.he_normal(keys(), (k, k, c), fan_in=k * k * c)
      p["w_point_IO"] = conv_ops.he_normal(keys(), (c, c))
    else:
      p["w_HWIO"] = conv_ops.he_normal(keys(), (k, k, c, c))
    p["bn_out"], s["bn_out"] = _bn_pair(c)
  return p, s


def _apply_op(op: int, p, s, x_NHWC, *, train, cfg, fixed: bool):
  """One op. Search (``fixed=False``): 1x1-BN-ReLU-op[-BN-ReLU]. Fixed: a leading
  ReLU and no trailing ReLU (the original's two layer orders)."""
  h = jax.nn.relu(x_NHWC) if fixed else x_NHWC
  h = _pointwise(h, p["w_in_IO"])
  h, st_in = _bn(h, p["bn_in"], s["bn_in"], train=train, cfg=cfg)
  h = jax.nn.relu(h)
  if op in _POOLS:
    return _POOLS[op](h, 3, 1, kernels=cfg.kernels), {"bn_in": st_in}
  if op in _SEPARABLE:
    h = conv_ops.separable_conv2d(h, p["w_depth_HWC"], p["w_point_IO"], kernels=cfg.kernels)
    eps = cfg.bn_eps if fixed else cfg.sep_bn_eps
  else:
    h = conv_ops.conv2d(h, p["w_HWIO"], kernels=cfg.kernels)
    eps = cfg.bn_eps
  h, st_out = _bn(h, p["bn_out"], s["bn_out"], train=train, cfg=cfg, eps=eps)
  if not fixed:
    h = jax.nn.relu(h)
  return h, {"bn_in": st_in, "bn_out": st_out}


# --------------------------------------------------------------- shared child
def init_shared(key: jax.Array, cfg: MacroChildConfig):
  """``(params, batch_stats)`` of the weight-shared child (layout: module doc)."""
  keys = _Keys(key)
  c = cfg.out_filters
  params, stats = {}, {}
  params["stem"], stats["stem"] = _init_stem(keys, c)
  lps, lss = [], []
  for l in range(cfg.num_layers):
    pairs = [_init_op(keys, op, c) for op in range(NUM_OPS)]
    lp = {"branches": tuple(p for p, _ in pairs)}
    ls = {"branches": tuple(s for _, s in pairs)}
    if l > 0:
      lp["skip_bn"], ls["skip_bn"] = _bn_pair(c)
    lps.append(lp)
    lss.append(ls)
  params["layers"], stats["layers"] = tuple(lps), tuple(lss)
  rps, rss = [], []
  for pl in cfg.pool_layers:
    pairs = [_init_reduce(keys, c, c) for _ in range(pl + 2)]  # stem + L_0..L_pl
    rps.append(tuple(p for p, _ in pairs))
    rss.append(tuple(s for _, s in pairs))
  params["reduce"], stats["reduce"] = tuple(rps), tuple(rss)
  params["fc"] = {"w_CK": conv_ops.he_normal(keys(), (c, cfg.num_classes))}
  return params, stats


def _search_branch(op: int, train: bool, cfg: MacroChildConfig):
  """Branch ``op`` of a search layer: ``(x, all branch params, all branch stats)
  -> (y, all branch stats with only entry ``op`` updated)``."""

  def branch(operand):
    x_NHWC, ps, ss = operand
    y, st = _apply_op(op, ps[op], ss[op], x_NHWC, train=train, cfg=cfg, fixed=False)
    return y, ss[:op] + (st,) + ss[op + 1:]

  return branch


def apply_shared(params, batch_stats, arc, images_NHWC, *, train: bool, key=None,
                 cfg: MacroChildConfig):
  """``(logits [N, num_classes], None, new batch_stats)`` of the shared child for
  one arc (``None``: no auxiliary head; the image spaces' one convention).

  ``arc``: a traced/device ``int32`` array of the codec's length (one compiled
  function for every arc; invalid tokens are not caught here, ``lax.switch``
  clamps them), or a numpy array / sequence (validated; the arc is baked in and
  only its branches are built). ``key``: dropout key, needed when ``train`` and
  ``keep_prob < 1``.
  """
  ops, bits = _split_arc(arc, cfg)
  branches = [_search_branch(op, train, cfg) for op in range(NUM_OPS)]
  x, st_stem = _apply_stem(params["stem"], batch_stats["stem"], images_NHWC, train=train,
                           cfg=cfg)
  if cfg.scan_layers and not _is_static_arc(arc):
    return _apply_shared_scanned(params, batch_stats, ops, bits, x, st_stem, branches,
                                 train=train, key=key, cfg=cfg)
  layers = [x]
  new_layers, new_reduce = [], []
  for l in range(cfg.num_layers):
    lp, ls = params["layers"][l], batch_stats["layers"][l]
    out, st_br = conv_ops.select_branch(
        ops[l], branches, (layers[-1], lp["branches"], ls["branches"]),
        mode=cfg.op_select, kernels=cfg.kernels, checkpoint=cfg.checkpoint_branches)
    nls = {"branches": st_br}
    if l > 0:
      if isinstance(bits[l], np.ndarray):
        for j in np.flatnonzero(bits[l]):
          out = out + layers[j]
      else:
        # A 0/1 mask: exact, and the same graph for every arc.
        bits_f = bits[l].astype(out.dtype)
        for j in range(l):
          out = out + bits_f[j] * layers[j]
      out, nls["skip_bn"] = _bn(out, lp["skip_bn"], ls["skip_bn"], train=train, cfg=cfg)
    new_layers.append(nls)
    layers.append(out)
    if l in cfg.pool_layers:
      r = cfg.pool_layers.index(l)
      layers, rs = _reduce_all(params["reduce"][r], batch_stats["reduce"][r], layers,
                               train=train, cfg=cfg)
      new_reduce.append(rs)
  logits = _head(params["fc"], layers[-1], train=train, key=key, cfg=cfg)
  return logits, None, {"stem": st_stem, "layers": tuple(new_layers),
                        "reduce": tuple(new_reduce)}


def _stages(cfg: MacroChildConfig):
  """``[(first, last)]`` layers of each stage (the reductions end a stage)."""
  ends = list(cfg.pool_layers) + [cfg.num_layers - 1]
  starts = [0] + [pl + 1 for pl in cfg.pool_layers]
  return [(a, b) for a, b in zip(starts, ends) if a <= b]


def _apply_shared_scanned(params, batch_stats, ops, bits, x, st_stem, branches, *, train,
                          key, cfg: MacroChildConfig):
  """:func:`apply_shared` on a traced arc with ``scan_layers``: the list of
  layer outputs is one ``[L + 1, N, H, W, C]`` buffer (slot 0 the stem, slot
  ``l + 1`` layer ``l``, zeros until written), and the layers of a stage after
  layer 0 run as one ``lax.scan`` over their weights (stacked here, in the
  step): each reads its input from slot ``l``, adds ``sum_j bit_j slot_j`` with
  the bits zero-padded to ``L + 1``, and writes slot ``l + 1``. XLA then
  compiles a layer once per stage instead of once per layer."""
  L = cfg.num_layers
  buf = jnp.concatenate([x[None], jnp.zeros((L,) + x.shape, x.dtype)])
  new_layers, new_reduce = [None] * L, []

  def layer(buf, step):
    lp, ls, op, mask, l = step
    h = jax.lax.dynamic_index_in_dim(buf, l, 0, keepdims=False)
    out, st_br = conv_ops.select_branch(
        op, branches, (h, lp["branches"], ls["branches"]),
        mode=cfg.op_select, kernels=cfg.kernels, checkpoint=cfg.checkpoint_branches)
    nls = {"branches": st_br}
    if "skip_bn" in lp:
      # The zero-padded bits select the skips: exact zeros for the others.
      out = out + jnp.tensordot(mask.astype(out.dtype), buf, 1)
      out, nls["skip_bn"] = _bn(out, lp["skip_bn"], ls["skip_bn"], train=train, cfg=cfg)
    return jax.lax.dynamic_update_index_in_dim(buf, out, l + 1, 0), nls

  for first, last in _stages(cfg):
    runs = [[first], list(range(first + 1, last + 1))] if first == 0 else [
        list(range(first, last + 1))]
    for run in runs:
      if not run:
        continue
      stack = lambda *a: jnp.stack(a)
      xs = (jax.tree.map(stack, *[params["layers"][l] for l in run]),
            jax.tree.map(stack, *[batch_stats["layers"][l] for l in run]),
            jnp.stack([ops[l] for l in run]),
            jnp.stack([jnp.pad(jnp.asarray(bits[l], jnp.int32), (0, L + 1 - l)) for l in run]),
            jnp.asarray(run, jnp.int32))
      buf, stacked = jax.lax.scan(layer, buf, xs)
      for k, l in enumerate(run):
        new_layers[l] = jax.tree.map(lambda a, k=k: a[k], stacked)
    if last in cfg.pool_layers:
      r = cfg.pool_layers.index(last)
      reduced, rs = _reduce_all(params["reduce"][r], batch_stats["reduce"][r],
                                [buf[j] for j in range(last + 2)], train=train, cfg=cfg)
      new_reduce.append(rs)
      y = reduced[0]
      buf = jnp.concatenate([jnp.stack(reduced),
                             jnp.zeros((L - last - 1,) + y.shape, y.dtype)])
  logits = _head(params["fc"], buf[L], train=train, key=key, cfg=cfg)
  return logits, None, {"stem": st_stem, "layers": tuple(new_layers),
                        "reduce": tuple(new_reduce)}


# ---------------------------------------------------------------- fixed child
def _static_arc(arc, cfg: MacroChildConfig, where: str):
  if not _is_static_arc(arc):
    raise ValueError(
        f"{where}: the fixed child needs a concrete numpy arc (it builds only the arc's "
        f"ops); got {type(arc).__name__}. Use apply_shared for a traced arc.")
  return _split_arc(arc, cfg)


def init_fixed(key: jax.Array, cfg: MacroChildConfig, arc):
  """``(params, batch_stats)`` of the fixed child for ``arc`` (numpy, validated)."""
  ops, bits = _static_arc(arc, cfg, "init_fixed")
  keys = _Keys(key)
  c = cfg.out_filters
  params, stats = {}, {}
  params["stem"], stats["stem"] = _init_stem(keys, c)
  lps, lss, rps, rss = [], [], [], []
  for l in range(cfg.num_layers):
    p_op, s_op = _init_op(keys, int(ops[l]), c)
    lp, ls = {"op": p_op}, {"op": s_op}
    if l > 0:
      n_in = (int(np.sum(bits[l])) + 1) * c
      bp, bs = _bn_pair(c)
      lp["skip"] = {"w_IO": conv_ops.he_normal(keys(), (n_in, c)), "bn": bp}
      ls["skip"] = {"bn": bs}
    lps.append(lp)
    lss.append(ls)
    if l in cfg.pool_layers:
      pairs = [_init_reduce(keys, c, 2 * c) for _ in range(l + 2)]
      rps.append(tuple(p for p, _ in pairs))
      rss.append(tuple(s for _, s in pairs))
      c *= 2
  params["layers"], stats["layers"] = tuple(lps), tuple(lss)
  params["reduce"], stats["reduce"] = tuple(rps), tuple(rss)
  params["fc"] = {"w_CK": conv_ops.he_normal(keys(), (c, cfg.num_classes))}
  return params, stats


def _fixed_layer(diff, extra, *, op, first, train, cfg):
  """One layer of the fixed child: its op on ``x``, then (after the first layer)
  concat with the ``skip_inputs`` -> ReLU -> 1x1 -> BN. ``(output, new stats)``."""
  del extra  # no randomness inside a layer (the head's dropout comes after)
  lp, ls, x, skip_inputs = diff
  out, st_op = _apply_op(op, lp["op"], ls["op"], x, train=train, cfg=cfg, fixed=True)
  nls = {"op": st_op}
  if not first:
    cat = jnp.concatenate(list(skip_inputs) + [out], axis=-1)
    out = _pointwise(jax.nn.relu(cat), lp["skip"]["w_IO"])
    out, st = _bn(out, lp["skip"]["bn"], ls["skip"]["bn"], train=train, cfg=cfg)
    nls["skip"] = {"bn": st}
  return out, nls


def apply_fixed(params, batch_stats, arc, images_NHWC, *, train: bool, key=None,
                cfg: MacroChildConfig, progress=0.0):
  """``(logits, None, new batch_stats)`` of the fixed child (``arc``: the numpy arc
  that :func:`init_fixed` was given; ``progress`` is unused: no drop-path)."""
  ops, bits = _static_arc(arc, cfg, "apply_fixed")
  x, st_stem = _apply_stem(params["stem"], batch_stats["stem"], images_NHWC, train=train,
                           cfg=cfg)
  layers = [x]
  new_layers, new_reduce = [], []
  for l in range(cfg.num_layers):
    run = functools.partial(_fixed_layer, op=int(ops[l]), first=l == 0, train=train, cfg=cfg)
    if cfg.remat == "layers" and train:
      # Saves the layer's inputs, recomputes the rest.
      run = remat.recompute_in_backward(run, cfg.kernels)
    out, nls = run((params["layers"][l], batch_stats["layers"][l], layers[-1],
                    [layers[j] for j in np.flatnonzero(bits[l])] if l > 0 else []), None)
    new_layers.append(nls)
    layers.append(out)
    if l in cfg.pool_layers:
      r = cfg.pool_layers.index(l)
      layers, rs = _reduce_all(params["reduce"][r], batch_stats["reduce"][r], layers,
                               train=train, cfg=cfg)
      new_reduce.append(rs)
  logits = _head(params["fc"], layers[-1], train=train, key=key, cfg=cfg)
  return logits, None, {"stem": st_stem, "layers": tuple(new_layers),
                        "reduce": tuple(new_reduce)}


count_params = base.count_params
