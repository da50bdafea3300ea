"""Child language models of the PTB space: the weight-shared one and the fixed one.

Both are plain pytrees plus pure functions. The *view* of a child is the pytree
``{"emb": [V,H], "w0": [2H,2H], "w_nodes": [N-1,H,2H]}``: exactly the parameters
of a fixed cell. The shared child stores one matrix per (node, previous node,
activation) and :func:`gather` cuts the view for an arc out of it (a traced
arc: one compilation for all arcs); :func:`scatter` writes an updated view back,
so an SGD step only touches the slices the arc used. The fixed child *is* a
view, run with the arc as Python constants (no gather, no switch).

Shapes are suffixed in names where it helps: B batch, T time, H hidden,
V vocabulary, N nodes.

Precision (``ChildConfig.compute_dtype``): matmul inputs and the cell's node
activations are in the compute dtype (bfloat16 halves their bytes on GPU/TPU);
parameters (and so gradients and the optimizer state), dropout scaling, the
cell output that is carried from step to step and across windows, batch-norm
statistics, the logits' softmax and every loss term stay float32. In float32
every cast is a no-op and the computation is the plain one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from enas_jax import backend
from enas_jax.spaces import base
from enas_jax.spaces import ptb as ptb_space

WEIGHT_DECAY_MODES = ("none", "l2", "w4_selected")
OP_SELECT_MODES = ("switch", "mask")


@dataclasses.dataclass(frozen=True)
class ChildConfig:
  """Static settings of a PTB child network (hashable: safe to close over in jit)."""
  vocab_size: int
  hidden_size: int
  num_nodes: int = 12
  aggregate: str = "loose_ends"
  init_range: float = 0.04
  drop_e: float = 0.0  # embedding-row dropout (whole word vectors), drop probability
  drop_i: float = 0.0  # locked dropout on looked-up embeddings [B,1,H]
  drop_x: float = 0.0  # mask on x into node 0 [B,H]
  drop_l: float = 0.0  # mask on h_{t-1} in node 0 and on every node's input [B,H]
  drop_o: float = 0.0  # locked dropout on the cell output [B,1,H]
  alpha: float = 0.0  # activation regularisation: alpha * mean(h^2)
  beta: float = 0.0  # temporal (slowness) regularisation: beta * mean((h_t+1 - h_t)^2)
  weight_decay: float = 0.0
  weight_decay_mode: str = "l2"  # see WEIGHT_DECAY_MODES and loss()
  share_across_activations: bool = False  # the PyTorch port's layout
  op_select: str = "switch"
  scan_unroll: int = 1
  remat: str = "none"  # "none" | "dots" (save only matmul outputs per step) | "full"
  # The seed's search-time batch norm (off in the corrected code): on every node's
  # 2H pre-activation and on the cell output, statistics over the batch, no
  # scale/offset, moving averages with this decay and epsilon.
  batch_norm: bool = False
  bn_decay: float = 0.999
  bn_eps: float = 1.0
  # Dtype of activations and matmul inputs: "float32" or "bfloat16" (resolved;
  # from_config turns the config's "auto" into the platform's default).
  compute_dtype: str = "float32"

  def __post_init__(self):
    if self.weight_decay_mode not in WEIGHT_DECAY_MODES:
      raise ValueError(f"child.weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, "
                       f"got {self.weight_decay_mode!r}.")
    if self.remat not in ("none", "dots", "full"):
      raise ValueError(f"child.remat must be 'none', 'dots' or 'full', got {self.remat!r}.")
    if self.op_select not in OP_SELECT_MODES + ("auto",):
      raise ValueError(f"child.op_select must be one of {OP_SELECT_MODES + ('auto',)}, "
                       f"got {self.op_select!r}.")
    if self.compute_dtype not in backend.COMPUTE_DTYPES[1:]:
      raise ValueError(f"ChildConfig.compute_dtype must be one of {backend.COMPUTE_DTYPES[1:]} "
                       f"(resolve 'auto' with enas_jax.backend), got {self.compute_dtype!r}.")
    for name in ("drop_e", "drop_i", "drop_x", "drop_l", "drop_o"):
      v = getattr(self, name)
      if not 0.0 <= v < 1.0:
        raise ValueError(f"child.{name} is a drop probability in [0, 1), got {v!r}.")

  @property
  def num_acts(self) -> int:
    """Activation slots per (node, prev) in the shared weights."""
    return 1 if self.share_across_activations else len(ptb_space.ACTIVATION_NAMES)

  @property
  def dtype(self):
    """The jnp compute dtype."""
    return backend.jnp_dtype(self.compute_dtype)

  @classmethod
  def from_config(cls, config) -> "ChildConfig":
    """From a run config. ``auto`` values (``child.op_select``,
    ``child.compute_dtype``) are resolved by :mod:`enas_jax.backend` for
    ``child.platform`` when the config names one, else for the running backend."""
    c, s = config.child, config.space
    platform = c.get("platform", None)  # not a config field: set for cross-target builds (aot)
    # op_select "auto" is "switch" (measured on XLA:CPU: switch 1.01-1.08x the
    # static cell, mask 1.08-1.15x; no GPU/TPU measurement yet).
    op_select = backend.resolve_op_select(c.op_select, platform)
    compute_dtype = backend.resolve_compute_dtype(c.compute_dtype, platform)
    return cls(
        vocab_size=int(config.data.vocab_size), hidden_size=int(c.hidden_size),
        num_nodes=int(s.num_nodes), aggregate=s.aggregate, init_range=float(c.init_range),
        drop_e=float(c.drop_e), drop_i=float(c.drop_i), drop_x=float(c.drop_x),
        drop_l=float(c.drop_l), drop_o=float(c.drop_o), alpha=float(c.alpha),
        beta=float(c.beta), weight_decay=float(c.weight_decay),
        weight_decay_mode=c.weight_decay_mode,
        share_across_activations=bool(c.share_across_activations),
        op_select=op_select, scan_unroll=int(c.scan_unroll),
        remat=c.remat, batch_norm=bool(c.batch_norm),
        bn_decay=float(c.bn_decay), bn_eps=float(c.bn_eps),
        compute_dtype=compute_dtype)


# --------------------------------------------------------------------- params
def _uniform(key, shape, r, sharding=None):
  """U(-r, r). With ``sharding``, one small jitted call per tensor writes it
  straight into that layout: the RNG temporaries of one tensor at a time, no
  copy of the (up to 2 GB) shared weights."""
  if sharding is None:
    return jax.random.uniform(key, shape, jnp.float32, -r, r)
  fn = jax.jit(lambda k: jax.random.uniform(k, shape, jnp.float32, -r, r),
               out_shardings=sharding)
  return fn(key)


def init_shared(key: jax.Array, cc: ChildConfig, sharding=None) -> dict:
  """Shared weights: ``w0[act]`` [A,2H,2H]; node i: ``w_nodes[i-1][prev*A + act]`` [i*A,H,2H]."""
  H, A, r = cc.hidden_size, cc.num_acts, cc.init_range
  keys = jax.random.split(key, cc.num_nodes + 1)
  return {
      "emb": _uniform(keys[0], (cc.vocab_size, H), r, sharding),
      "w0": _uniform(keys[1], (A, 2 * H, 2 * H), r, sharding),
      "w_nodes": tuple(_uniform(keys[i + 1], (i * A, H, 2 * H), r, sharding)
                       for i in range(1, cc.num_nodes)),
  }


def init_fixed(key: jax.Array, cc: ChildConfig, sharding=None) -> dict:
  """Parameters of one fixed cell (a view)."""
  H, r = cc.hidden_size, cc.init_range
  k0, k1, k2 = jax.random.split(key, 3)
  return {
      "emb": _uniform(k0, (cc.vocab_size, H), r, sharding),
      "w0": _uniform(k1, (2 * H, 2 * H), r, sharding),
      "w_nodes": _uniform(k2, (cc.num_nodes - 1, H, 2 * H), r, sharding),
  }


def _slot_indices(arc, cc: ChildConfig):
  """Row of w0 and of each w_nodes[i-1] that the arc uses (traced-safe)."""
  arc = jnp.asarray(arc, jnp.int32)
  if cc.share_across_activations:
    return jnp.int32(0), arc[1::2]
  return arc[0], arc[1::2] * cc.num_acts + arc[2::2]


def gather(shared: dict, arc, cc: ChildConfig) -> dict:
  """The view (fixed-cell parameters) of ``arc`` inside the shared weights."""
  i0, rows = _slot_indices(arc, cc)
  w_nodes = jnp.stack([jax.lax.dynamic_index_in_dim(w, rows[i], keepdims=False)
                       for i, w in enumerate(shared["w_nodes"])])
  return {"emb": shared["emb"],
          "w0": jax.lax.dynamic_index_in_dim(shared["w0"], i0, keepdims=False),
          "w_nodes": w_nodes}


def scatter(shared: dict, arc, view: dict, cc: ChildConfig) -> dict:
  """Writes a (possibly updated) view back into the shared weights."""
  i0, rows = _slot_indices(arc, cc)
  upd = lambda w, v, i: jax.lax.dynamic_update_index_in_dim(w, v, i, 0)  # noqa: E731
  return {"emb": view["emb"],
          "w0": upd(shared["w0"], view["w0"], i0),
          "w_nodes": tuple(upd(w, view["w_nodes"][i], rows[i])
                           for i, w in enumerate(shared["w_nodes"]))}


count_params = base.count_params


# -------------------------------------------------------------------- dropout
def _keep_mask(key, shape, drop):
  keep = 1.0 - drop
  return jax.random.bernoulli(key, keep, shape).astype(jnp.float32) / keep


def make_masks(key: jax.Array | None, batch: int, cc: ChildConfig) -> dict | None:
  """Dropout masks for one BPTT window, locked across its time steps."""
  if key is None:
    return None
  ke, ki, kx, kl, ko = jax.random.split(key, 5)
  H = cc.hidden_size
  m = {}
  if cc.drop_e > 0:
    m["e"] = _keep_mask(ke, (cc.vocab_size,), cc.drop_e)
  if cc.drop_i > 0:
    m["i"] = _keep_mask(ki, (batch, H), cc.drop_i)
  if cc.drop_x > 0:
    m["x"] = _keep_mask(kx, (batch, H), cc.drop_x)
  if cc.drop_l > 0:
    m["l"] = _keep_mask(kl, (batch, H), cc.drop_l)
  if cc.drop_o > 0:
    m["o"] = _keep_mask(ko, (batch, H), cc.drop_o)
  return m


# ---------------------------------------------------------------------- cell
def _activate(a, x, cc: ChildConfig, static: bool):
  if static:
    return ptb_space.ACTIVATIONS[int(a)](x)
  if cc.op_select == "mask":
    # Compute all four and pick one; jnp.where keeps NaN-free gradients.
    out = x
    for k, f in enumerate(ptb_space.ACTIVATIONS):
      out = jnp.where(a == k, f(x), out) if k != 2 else out
    return out
  return jax.lax.switch(a, ptb_space.ACTIVATIONS, x)


def _highway(s_BxH, pre_Bx2H, a, cc, static):
  c, g = jnp.split(pre_Bx2H, 2, axis=-1)
  return s_BxH + jax.nn.sigmoid(g) * (_activate(a, c, cc, static) - s_BxH)


def init_batch_stats(cc: ChildConfig) -> dict:
  """Moving statistics of the optional batch norm (``{}`` when it is off).

  One set per node position (shared by all arcs, as in the seed) and one for
  the cell output.
  """
  if not cc.batch_norm:
    return {}
  H, N = cc.hidden_size, cc.num_nodes
  return {"mean": jnp.zeros((N, 2 * H), jnp.float32), "var": jnp.ones((N, 2 * H), jnp.float32),
          "out_mean": jnp.zeros((H,), jnp.float32), "out_var": jnp.ones((H,), jnp.float32)}


def _bn(x_BxC, stats, eps):
  """Normalises with given (mean, var), or with batch moments when stats is None.

  Moments and normalisation in float32; returns (y in x's dtype, (mean, var))
  with the moments used."""
  dt = x_BxC.dtype
  x_BxC = x_BxC.astype(jnp.float32)
  if stats is None:
    mean = x_BxC.mean(axis=0)
    var = jnp.mean(jnp.square(x_BxC - mean), axis=0)
  else:
    mean, var = stats
  return ((x_BxC - mean) * jax.lax.rsqrt(var + eps)).astype(dt), (mean, var)


def _ema_over_time(old, moments_TxC, decay):
  """The moving average after T sequential updates ``m <- d*m + (1-d)*x_t``."""
  T = moments_TxC.shape[0]
  w = (1.0 - decay) * decay ** jnp.arange(T - 1, -1, -1, dtype=jnp.float32)
  return decay ** T * old + jnp.tensordot(w, moments_TxC, axes=1)


def run_cell(view: dict, arc, x_BxT: jax.Array, h0_BxH: jax.Array, masks: dict | None,
             cc: ChildConfig, static: bool, bn_stats: dict | None = None):
  """Runs the cell over a window. Returns (outputs [T,B,H] before output dropout, h_T).

  With ``cc.batch_norm``, ``bn_stats=None`` normalises with batch moments
  (training); moving statistics from :func:`init_batch_stats` normalise for
  evaluation. :func:`run_cell_bn` also returns the updated moving statistics.
  """
  return _run_cell(view, arc, x_BxT, h0_BxH, masks, cc, static, bn_stats)[:2]


def run_cell_bn(view, arc, x_BxT, h0_BxH, masks, cc, static, bn_stats):
  """Training-mode cell with batch norm: (outputs, h_T, updated moving stats)."""
  outs, h_last, moments = _run_cell(view, arc, x_BxT, h0_BxH, masks, cc, static, None)
  if not cc.batch_norm:
    return outs, h_last, bn_stats
  d = cc.bn_decay
  new = {"mean": _ema_over_time(bn_stats["mean"], moments[0], d),
         "var": _ema_over_time(bn_stats["var"], moments[1], d),
         "out_mean": _ema_over_time(bn_stats["out_mean"], moments[2], d),
         "out_var": _ema_over_time(bn_stats["out_var"], moments[3], d)}
  return outs, h_last, jax.lax.stop_gradient(new)


def _run_cell(view, arc, x_BxT, h0_BxH, masks, cc, static, bn_stats):
  if static:
    arc = np.asarray(arc)
  H, N = cc.hidden_size, cc.num_nodes
  dt, f32 = cc.dtype, jnp.float32
  m = masks or {}
  emb = view["emb"]
  x_BxTxH = jnp.take(emb, x_BxT, axis=0)
  if "e" in m:
    x_BxTxH = x_BxTxH * jnp.take(m["e"], x_BxT, axis=0)[..., None]
  if "i" in m:
    x_BxTxH = x_BxTxH * m["i"][:, None, :]
  if "x" in m:
    x_BxTxH = x_BxTxH * m["x"][:, None, :]
  # Dropout is applied in float32 (exact 1/keep scaling); matmul inputs and the
  # nodes are in the compute dtype from here on.
  x_BxTxH = x_BxTxH.astype(dt)
  w0 = view["w0"].astype(dt)
  # The x half of node 0's matmul does not depend on the state: one big matmul.
  xw_TxBx2H = jnp.einsum("bth,hk->tbk", x_BxTxH, w0[:H])
  w0_h = w0[H:]
  w_nodes = view["w_nodes"].astype(dt)
  out_w = ptb_space.output_weights(arc, N, cc.aggregate, static)
  ml = m.get("l")

  use_bn = cc.batch_norm
  moments = []

  def norm(k, pre):
    """Batch norm of node k's pre-activation (identity when off)."""
    if not use_bn:
      return pre
    st = None if bn_stats is None else (bn_stats["mean"][k], bn_stats["var"][k])
    y, mv = _bn(pre, st, cc.bn_eps)
    moments.append(mv)
    return y

  def step(h_BxH, xw_Bx2H):
    # h_BxH (the carry) is float32; the nodes are in the compute dtype.
    moments.clear()
    hm = (h_BxH * ml if ml is not None else h_BxH).astype(dt)
    nodes = [_highway(h_BxH.astype(dt), norm(0, xw_Bx2H + hm @ w0_h), arc[0], cc, static)]
    for i in range(1, N):
      p = arc[2 * i - 1]
      if static:
        s = nodes[int(p)]
      else:
        # A chain of selects instead of a gather from stacked nodes: XLA fuses it
        # into one elementwise loop and its gradient is selects too (measured
        # 1.4x faster for the whole cell than dynamic indexing on XLA:CPU).
        s = nodes[0]
        for j in range(1, i):
          s = jnp.where(p == j, nodes[j], s)
      sm = (s * ml).astype(dt) if ml is not None else s
      nodes.append(_highway(s, norm(i, sm @ w_nodes[i - 1]), arc[2 * i], cc, static))
    # The output (the next carry) is summed in float32.
    if static:
      out = sum(float(out_w[k]) * nodes[k].astype(f32) for k in range(N) if out_w[k] > 0)
    else:
      # Weighted sum without stacking (fuses into one loop); jnp.where keeps a
      # non-finite node that is not an output from turning the output into NaN.
      out = sum(jnp.where(out_w[k] > 0, out_w[k] * nodes[k].astype(f32), 0.0)
                for k in range(N))
    if not use_bn:
      return out, (out, ())
    st = None if bn_stats is None else (bn_stats["out_mean"], bn_stats["out_var"])
    out, (om, ov) = _bn(out, st, cc.bn_eps)
    mom = (jnp.stack([m for m, _ in moments]), jnp.stack([v for _, v in moments]), om, ov)
    return out, (out, mom)

  if cc.remat == "full":
    step = jax.checkpoint(step)
  elif cc.remat == "dots":
    step = jax.checkpoint(step, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  h_last, (outs_TxBxH, moments_T) = jax.lax.scan(step, h0_BxH.astype(f32), xw_TxBx2H,
                                                 unroll=cc.scan_unroll)
  return outs_TxBxH, h_last, moments_T


def token_ce(view, outs_TxBxH, y_BxT, masks=None, compute_dtype: str = "float32"):
  """Per-token cross-entropy [T,B] of the tied-embedding softmax.

  One [B*T, H] x [H, V] matmul on the outputs flattened batch-major: with the
  batch split over devices each device keeps its own rows (flattening the
  time-major [T,B] into one axis cannot keep a split of B, and XLA gathered
  the whole batch onto every device). Only the small [T,B,H] outputs are
  transposed, never the [.., V] logits or their gradient. The matmul inputs
  are in ``compute_dtype``; the logits and the softmax are float32.
  """
  if masks and "o" in masks:
    outs_TxBxH = outs_TxBxH * masks["o"][None]
  T, B, H = outs_TxBxH.shape
  flat_NxH = jnp.swapaxes(outs_TxBxH, 0, 1).reshape(B * T, H)
  if compute_dtype == "float32":
    logits_NxV = flat_NxH @ view["emb"].T  # tied embedding
  else:
    dt = backend.jnp_dtype(compute_dtype)
    logits_NxV = jnp.matmul(flat_NxH.astype(dt), view["emb"].astype(dt).T,
                            preferred_element_type=jnp.float32)
  y_N = y_BxT.reshape(B * T)
  lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
  tgt_N = jnp.take_along_axis(logits_NxV, y_N[:, None], axis=1)[:, 0]
  return (lse_N - tgt_N).reshape(B, T).T


def weight_penalty(view: dict, cc: ChildConfig) -> jax.Array:
  """Weight decay added to the loss.

  ``l2``: ``wd * sum(w^2)`` over the view (for the fixed child: all trainables,
  the corrected final recipe; for search: the slices the arc used).
  ``w4_selected``: the corrected search code's quirk, ``wd * sum(w^4) / 2`` over
  node 0's matrix and the selected matrices of nodes 2.. (node 1 and the
  embedding excluded).
  """
  if cc.weight_decay <= 0 or cc.weight_decay_mode == "none":
    return jnp.float32(0.0)
  if cc.weight_decay_mode == "l2":
    return cc.weight_decay * sum(jnp.sum(jnp.square(w)) for w in jax.tree_util.tree_leaves(view))
  sel = [view["w0"], view["w_nodes"][1:]]
  return cc.weight_decay * 0.5 * sum(jnp.sum(jnp.square(jnp.square(w))) for w in sel)


def loss(view: dict, arc, x_BxT, y_BxT, h0_BxH, key, cc: ChildConfig, static: bool,
         weights_BxT=None, bn_stats: dict | None = None, length=None):
  """Training loss of one window.

  Returns (loss, aux) with aux = {ce, h, penalty, bn_stats} (``bn_stats``: the
  updated moving statistics of the optional batch norm, ``{}`` when off).
  ``length`` (traced scalar): the window is padded, only its first ``length``
  steps are real (cross-entropy, AR and TAR are means over real steps).
  """
  masks = make_masks(key, x_BxT.shape[0], cc)
  outs, h_last, new_stats = run_cell_bn(view, arc, x_BxT, h0_BxH, masks, cc, static,
                                        bn_stats if bn_stats is not None else {})
  T = x_BxT.shape[1]
  if length is not None:
    # A window padded to its bucket: only the first `length` steps count, and
    # the state carried on is the one after the last real token.
    valid_T = jnp.arange(T) < length
    h_last = jax.lax.dynamic_index_in_dim(outs, length - 1, keepdims=False)
    w_TxB = jnp.broadcast_to(valid_T[:, None], (T, x_BxT.shape[0])).astype(jnp.float32)
    if weights_BxT is not None:
      w_TxB = w_TxB * weights_BxT.T
  else:
    valid_T = None
    w_TxB = None if weights_BxT is None else weights_BxT.T
  ce_TxB = token_ce(view, outs, y_BxT, masks, cc.compute_dtype)
  if w_TxB is None:
    ce = ce_TxB.mean()
  else:
    ce = (ce_TxB * w_TxB).sum() / jnp.maximum(w_TxB.sum(), 1.0)
  total = ce

  def masked_mean(sq_TxBxH, v_T):
    if v_T is None:
      return jnp.mean(sq_TxBxH)
    v = v_T.astype(jnp.float32)[:, None, None]
    return (sq_TxBxH * v).sum() / jnp.maximum(v.sum() * sq_TxBxH[0].size, 1.0)

  if cc.alpha > 0:  # AR on the outputs before output dropout
    total = total + cc.alpha * masked_mean(jnp.square(outs), valid_T)
  if cc.beta > 0:  # TAR over consecutive real steps
    v = None if valid_T is None else valid_T[1:]
    total = total + cc.beta * masked_mean(jnp.square(outs[1:] - outs[:-1]), v)
  pen = weight_penalty(view, cc)
  total = total + pen
  return total, {"ce": ce, "h": jax.lax.stop_gradient(h_last), "penalty": pen,
                 "bn_stats": new_stats}


def eval_ce_sum(view: dict, arc, x_BxT, y_BxT, h0_BxH, cc: ChildConfig, static: bool,
                bn_stats: dict | None = None):
  """Summed cross-entropy of one window without dropout. Returns (sum_ce, h_T).

  With batch norm on, ``bn_stats`` (the moving statistics) are required.
  """
  if cc.batch_norm and not bn_stats:
    raise ValueError("eval_ce_sum: child.batch_norm is on; pass the moving statistics (bn_stats).")
  outs, h_last = run_cell(view, arc, x_BxT, h0_BxH, None, cc, static,
                          bn_stats if cc.batch_norm else None)
  return token_ce(view, outs, y_BxT, compute_dtype=cc.compute_dtype).sum(), h_last
