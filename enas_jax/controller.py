"""The ENAS LSTM controller (Pham et al. 2018), independent of the search space.

The controller only knows a :class:`~enas_jax.spaces.base.Decisions` program: a
static list of steps, each an ``OP`` softmax, an attention ``POINTER`` over
earlier nodes' anchors, or an ``ANCHOR`` step with no decision. It runs the
program as ONE ``jax.lax.scan`` over the steps, carrying the LSTM state through
every step, so that:

* one compilation serves every arc (the arc is a traced ``int32`` array and
  never leaves the device);
* sampling an arc and scoring a given arc are the same code path
  (:func:`_run`), so their log-probabilities agree to the last bit of the
  arithmetic, which REINFORCE relies on (it samples, then recomputes the
  log-probability differentiably).

Heads are padded to ``decisions.max_choices`` and invalid choices get the
constant logit :data:`NEG_LOGIT`, which gives them exactly zero probability.
Nothing here uses ``lax.switch``, so ``vmap`` over keys or arcs is cheap.

Reference behaviour (``melodyguan/enas`` ``common_ops.lstm`` and the PTB /
CIFAR controllers; ``enas_lm`` ``controller.py``):

* LSTM: one bias-free ``[2S, 4S]`` matrix per layer on ``concat(x, h)``, gates
  ``i, f, o, g``; ``c' = σ(i)tanh(g) + σ(f)c``, ``h' = σ(o)tanh(c')``.
* Op logits ``h @ w_soft`` (``+ b_soft``, a learned bias, when the program
  asks for one), or ``h @ w_emb.T`` with :attr:`ControllerConfig.tie_op_logits`
  (``enas_lm``: no ``w_soft``, the op embedding scores the ops); pointer
  logits ``v·tanh(anchor_j @ W1 + h @ W2)``; then
  ``/temperature``, then ``tanh_constant·tanh`` (op steps use
  ``tanh_constant / op_tanh_reduce``); pointers then subtract the locality
  prior ``(i - j)² / 6`` (PTB-style pointers only); op steps then add the
  program's constant ``op_offset`` (the micro ``b_soft_no_learn``).
* Next input: ``w_emb[op]`` after an op, ``anchor_j / (0.1 + (i - j))`` after a
  PTB-style pointer or ``anchor_j`` after a micro-style one, ``g_emb`` after an
  anchor step.
* Micro controller: the program's ``cell`` index
  clears the anchors at the start of each cell while (c, h) carries on, and
  ``zero_anchor`` steps store a zero anchor with a non-zero attention key. All
  of these are switched on by the program (and ``op_tanh_reduce != 1``); when a
  program does not use a feature, its code is not traced at all, so PTB and
  macro computations are unchanged.
* "Entropy" in the original is ``Σ p(a)·(−log p(a))`` over the *sampled* tokens
  only (PTB, macro); the micro controller uses the full categorical entropy.
  Both are returned; :attr:`ControllerConfig.entropy_mode` picks which one is
  called ``entropy``. Entropies are always stop-gradient.
* A node whose anchor no step writes keeps a zero anchor *and* a zero
  attention key (``enas_lm``'s node 0). A program may list ``fixed_tokens``
  (an attribute of the program, e.g. :class:`enas_jax.spaces.ptb.PTBDecisions`):
  arc positions no step writes, which hold 0 in every sampled arc; a scored
  arc with another value there gets :data:`NEG_LOGIT`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from enas_jax.spaces.base import ANCHOR, BITS, OP, POINTER, POINTER_STYLES, Decisions

# Logit given to invalid (padded or out-of-range) choices. Finite on purpose:
# with -inf, p·log p and the gradients of log_softmax produce NaNs; -1e9 already
# underflows exp() to exactly 0 in float32, and a Gumbel sample (at most ~17 in
# float32) can never lift it above a valid logit.
NEG_LOGIT = -1e9

_ENTROPY_MODES = ("sampled", "full")


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
  """Hyperparameters of the controller. Frozen (hashable), so it can be static.

  Attributes:
    lstm_size: hidden size ``S`` of every LSTM layer (100 PTB, 64 CIFAR and
      ``enas_lm``).
    lstm_layers: number of stacked LSTM layers (every script uses 1).
    temperature: logits are divided by it; ``None`` or ``<= 0`` turns it off.
    tanh_constant: logits become ``c·tanh(logits)``; ``None`` or ``<= 0`` turns
      it off.
    init_range: every parameter is drawn from ``U[-r, r]`` (0.1 original, 0.01
      ``enas_lm``).
    locality_prior: subtract ``(i - j)² / 6`` from the logit of pointing from
      node ``i`` to node ``j`` (PTB controllers; not the CIFAR ones). Programs
      with ``pointer_style="micro"`` never use it.
    entropy_mode: ``"sampled"`` (``Σ p(a)(−log p(a))`` of the sampled tokens,
      PTB/macro original) or ``"full"`` (categorical entropy, micro original);
      selects which of the two is returned as ``entropy``.
    op_tanh_reduce: ``OP`` steps use ``(tanh_constant / op_tanh_reduce)·tanh``
      (micro search script: 2.5). Applies to the op steps of any program; the
      original's macro controller ignored the flag, so macro configs should
      leave it at 1.0. No effect when the tanh constant is off.
    tie_op_logits: op logits are ``h @ w_emb.T`` (the op embeddings that also
      feed the next step), and there is no ``w_soft`` (``enas_lm``'s PTB
      controller); False: a separate ``w_soft`` (every ``melodyguan/enas``
      controller).
  """

  lstm_size: int
  lstm_layers: int = 1
  temperature: Optional[float] = None
  tanh_constant: Optional[float] = None
  init_range: float = 0.1
  locality_prior: bool = True
  entropy_mode: str = "sampled"
  op_tanh_reduce: float = 1.0
  tie_op_logits: bool = False

  def __post_init__(self):
    if int(self.lstm_size) < 1:
      raise ValueError(f"ControllerConfig: lstm_size must be >= 1, got {self.lstm_size}.")
    if int(self.lstm_layers) < 1:
      raise ValueError(f"ControllerConfig: lstm_layers must be >= 1, got {self.lstm_layers}.")
    if not float(self.init_range) > 0:
      raise ValueError(f"ControllerConfig: init_range must be > 0, got {self.init_range}.")
    if self.entropy_mode not in _ENTROPY_MODES:
      raise ValueError(
          f"ControllerConfig: entropy_mode must be one of {_ENTROPY_MODES}, "
          f"got {self.entropy_mode!r}.")
    if not float(self.op_tanh_reduce) > 0:
      raise ValueError(
          f"ControllerConfig: op_tanh_reduce must be > 0, got {self.op_tanh_reduce}.")

  @property
  def use_temperature(self) -> bool:
    return self.temperature is not None and float(self.temperature) > 0

  @property
  def use_tanh(self) -> bool:
    return self.tanh_constant is not None and float(self.tanh_constant) > 0

  @classmethod
  def from_config(cls, cfg: Any) -> "ControllerConfig":
    """Builds a config from an ``ml_collections.ConfigDict`` (or any mapping).

    Reads the fields of this class by name; missing keys keep their defaults
    (``lstm_size`` is required) and extra keys are ignored: the spaces' schemas
    differ (``tie_op_logits`` is PTB's, ``op_tanh_reduce`` the CIFAR spaces').
    Values are converted to plain Python types so the result stays hashable.
    """
    def has(name):
      try:
        return name in cfg
      except TypeError:  # pragma: no cover - objects without __contains__
        return hasattr(cfg, name)

    def get(name):
      try:
        return cfg[name]
      except TypeError:  # pragma: no cover - attribute-only objects
        return getattr(cfg, name)

    if not has("lstm_size"):
      raise ValueError("ControllerConfig.from_config: the config has no 'lstm_size'.")
    kwargs = {}
    converters = {
        "lstm_size": int,
        "lstm_layers": int,
        "temperature": lambda v: None if v is None else float(v),
        "tanh_constant": lambda v: None if v is None else float(v),
        "init_range": float,
        "locality_prior": bool,
        "entropy_mode": str,
        "op_tanh_reduce": float,
        "tie_op_logits": bool,
    }
    for field in dataclasses.fields(cls):
      if has(field.name):
        kwargs[field.name] = converters[field.name](get(field.name))
    return cls(**kwargs)


def validate_decisions(decisions: Decisions) -> None:
  """Checks that a ``Decisions`` program is well formed; raises ``ValueError``.

  Run at trace time (cheap: the program is a handful of small numpy arrays). The
  device code trusts these invariants: e.g. a pointer's ``num_choices`` must not
  exceed its node index, or the distance ``i - j`` could be <= 0.
  """
  d = decisions
  n = d.num_steps
  for name in ("kind", "node", "num_choices", "token", "write_anchor", "cell", "zero_anchor"):
    if getattr(d, name) is None and name in ("cell", "zero_anchor"):
      continue
    a = np.asarray(getattr(d, name))
    if a.ndim != 1 or a.shape[0] != n:
      raise ValueError(
          f"Decisions.{name} must be 1-D of length num_steps={n}, got shape {a.shape}.")
  if n == 0:
    raise ValueError("Decisions: empty program.")
  if d.num_ops < 1 or d.num_nodes < 1 or d.arc_length < 1:
    raise ValueError(
        f"Decisions: num_ops={d.num_ops}, num_nodes={d.num_nodes}, "
        f"arc_length={d.arc_length} must all be >= 1.")
  if d.pointer_style not in POINTER_STYLES:
    raise ValueError(
        f"Decisions.pointer_style must be one of {POINTER_STYLES}, got {d.pointer_style!r}.")
  if d.op_offset is not None:
    off = np.asarray(d.op_offset)
    if off.shape != (n, d.num_ops):
      raise ValueError(
          f"Decisions.op_offset must have shape (num_steps, num_ops) = {(n, d.num_ops)}, "
          f"got {off.shape}.")
    if not np.all(np.isfinite(off)):
      raise ValueError("Decisions.op_offset must be finite.")
    stray = np.nonzero(np.any(off != 0, axis=1) & (np.asarray(d.kind) != OP))[0]
    if stray.size:
      raise ValueError(
          f"Decisions.op_offset: step {int(stray[0])} is not an OP step but has a "
          f"non-zero offset.")
  if d.op_bias_init is not None:
    b = np.asarray(d.op_bias_init, np.float64)
    if b.shape != (d.num_ops,) or not np.all(np.isfinite(b)):
      raise ValueError(
          f"Decisions.op_bias_init must be {d.num_ops} finite floats (one per op), "
          f"got {d.op_bias_init!r}.")
  seen_tokens = set()
  for t in range(n):
    kind, node = int(d.kind[t]), int(d.node[t])
    nc, tok = int(d.num_choices[t]), int(d.token[t])
    where = f"Decisions step {t} (kind {kind}, node {node})"
    if not 0 <= node < d.num_nodes:
      raise ValueError(f"{where}: node outside [0, num_nodes={d.num_nodes}).")
    if kind == ANCHOR or (kind == BITS and nc == 0):
      if tok != -1:
        raise ValueError(f"{where}: a step that writes no token must have token -1, got {tok}.")
      continue
    if kind == BITS:
      if not 1 <= nc <= node:
        raise ValueError(
            f"{where}: BITS num_choices={nc} must be in [0, node index {node}] "
            f"(one bit per earlier node).")
      for k in range(tok, tok + nc):
        if not 0 <= k < d.arc_length:
          raise ValueError(f"{where}: token {k} outside [0, arc_length={d.arc_length}).")
        if k in seen_tokens:
          raise ValueError(f"{where}: token {k} is written by two steps.")
        seen_tokens.add(k)
      continue
    if kind == OP:
      if not 1 <= nc <= d.num_ops:
        raise ValueError(f"{where}: OP num_choices={nc} outside [1, num_ops={d.num_ops}].")
    elif kind == POINTER:
      if not 1 <= nc <= node:
        raise ValueError(
            f"{where}: POINTER num_choices={nc} must be in [1, node index {node}] "
            f"(a pointer at node i chooses among nodes j < i).")
    else:
      raise ValueError(f"{where}: unknown kind {kind} (OP=0, POINTER=1, ANCHOR=2, BITS=3).")
    if not 0 <= tok < d.arc_length:
      raise ValueError(f"{where}: token {tok} outside [0, arc_length={d.arc_length}).")
    if tok in seen_tokens:
      raise ValueError(f"{where}: token {tok} is written by two steps.")
    seen_tokens.add(tok)
  fixed = _fixed_tokens(d)
  for tok in fixed:
    if not 0 <= tok < d.arc_length:
      raise ValueError(f"Decisions.fixed_tokens: {tok} outside [0, arc_length={d.arc_length}).")
    if tok in seen_tokens:
      raise ValueError(f"Decisions.fixed_tokens: token {tok} is also written by a step.")
  missing = sorted(set(range(d.arc_length)) - seen_tokens - set(fixed))
  if missing:
    raise ValueError(f"Decisions: arc tokens {missing} are never written by any step "
                     f"(and are not listed in fixed_tokens).")


def _fixed_tokens(decisions: Decisions) -> tuple:
  """Arc positions no step writes (they hold 0): the program's ``fixed_tokens``."""
  return tuple(sorted({int(t) for t in (getattr(decisions, "fixed_tokens", None) or ())}))


def init(rng: jax.Array, decisions: Decisions, cfg: ControllerConfig) -> dict:
  """Initial controller parameters, every entry float32 ``U[-r, r]``.

  Returns a plain dict:
    ``w_lstm`` ``[lstm_layers, 2S, 4S]`` (layer ``l`` reads ``concat(x, h_l)``),
    ``g_emb`` ``[1, S]``, ``w_emb`` ``[num_ops, S]``, ``w_soft`` ``[S, num_ops]``
    (absent with ``cfg.tie_op_logits``), ``w_attn_1`` and ``w_attn_2``
    ``[S, S]``, ``v_attn`` ``[S, 1]``; and, only when the program has
    ``op_bias_init``, the learned op bias ``b_soft`` ``[1, num_ops]``
    initialised to it (not random).
  """
  s, r = int(cfg.lstm_size), float(cfg.init_range)
  shapes = (
      ("g_emb", (1, s)),
      ("v_attn", (s, 1)),
      ("w_attn_1", (s, s)),
      ("w_attn_2", (s, s)),
      ("w_emb", (int(decisions.num_ops), s)),
      ("w_lstm", (int(cfg.lstm_layers), 2 * s, 4 * s)),
  ) + (() if cfg.tie_op_logits else (("w_soft", (s, int(decisions.num_ops))),))
  params = _uniform_params(rng, shapes, jnp.float32(r))
  if decisions.op_bias_init is not None:
    params["b_soft"] = jnp.asarray(decisions.op_bias_init, jnp.float32).reshape(1, -1)
  return params


@functools.partial(jax.jit, static_argnums=(1,))
def _uniform_params(rng, shapes, r):
  # One uniform draw for all tensors, jitted with the (hashable) shape table
  # static: XLA:CPU compiles one threefry call in ~0.1 s, one per tensor in ~1 s.
  sizes = [int(np.prod(shape)) for _, shape in shapes]
  flat = jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0) * r
  out, start = {}, 0
  for (name, shape), size in zip(shapes, sizes):
    out[name] = flat[start:start + size].reshape(shape)
    start += size
  return out


def _lstm_stack(w_lstm, x, c, h):
  """One step of the stacked bias-free LSTM. c, h: [L, S]; returns new c, h."""
  s = x.shape[-1]
  new_c, new_h = [], []
  inp = x
  for layer in range(w_lstm.shape[0]):
    z = jnp.concatenate([inp, h[layer]]) @ w_lstm[layer]
    i, f, o, g = z[:s], z[s:2 * s], z[2 * s:3 * s], z[3 * s:]
    c_l = jax.nn.sigmoid(i) * jnp.tanh(g) + jax.nn.sigmoid(f) * c[layer]
    h_l = jax.nn.sigmoid(o) * jnp.tanh(c_l)
    new_c.append(c_l)
    new_h.append(h_l)
    inp = h_l
  return jnp.stack(new_c), jnp.stack(new_h)


def _pad(x, width):
  return jnp.pad(x, (0, width - x.shape[0]))


class _Carry(NamedTuple):
  """What the scan carries from one step of the program to the next."""

  c: jax.Array  # [L, S] LSTM cell states
  h: jax.Array  # [L, S] LSTM outputs
  x: jax.Array  # [S] the next step's LSTM input
  anchors: jax.Array  # [num_nodes, S] each node's anchor (pointer inputs)
  anchor_w: jax.Array  # [num_nodes, S] each node's attention key (anchor @ w_attn_1)
  arc: jax.Array  # int32 [arc_length + max_choices]: padded so that bit runs never clip
  log_prob: jax.Array  # float32 scalars, summed over the steps so far
  ent_sampled: jax.Array
  ent_full: jax.Array


class _Step(NamedTuple):
  """One step of the program (the scanned inputs); the optional ones are None
  when the program does not use the feature."""

  t: jax.Array  # step index: the sample key is fold_in(rng, t)
  kind: jax.Array  # OP, POINTER, ANCHOR or BITS
  node: jax.Array
  num_choices: jax.Array
  token: jax.Array  # arc position written (-1: none)
  write_anchor: jax.Array
  new_cell: Optional[jax.Array] = None  # clear the anchors first (micro cells)
  zero_anchor: Optional[jax.Array] = None  # store a zero anchor, keep the key
  op_offset: Optional[jax.Array] = None  # [max_choices] constant added to op logits


@dataclasses.dataclass(frozen=True)
class _Program:
  """The static side of a run: shapes and the features the program and the
  config use (a feature not used is not traced at all)."""

  cfg: ControllerConfig
  width: int  # decisions.max_choices
  num_nodes: int
  num_ops: int
  arc_length: int
  use_new_cell: bool
  use_zero_anchor: bool
  use_op_offset: bool
  use_b_soft: bool
  micro_pointers: bool
  use_locality: bool

  @classmethod
  def of(cls, d: Decisions, cfg: ControllerConfig) -> "_Program":
    return cls(cfg=cfg, width=d.max_choices, num_nodes=int(d.num_nodes),
               num_ops=int(d.num_ops), arc_length=int(d.arc_length),
               use_new_cell=bool(d.step_new_cell.any()),
               use_zero_anchor=bool(d.step_zero_anchor.any()),
               use_op_offset=bool(np.any(d.step_op_offset != 0)),
               use_b_soft=d.op_bias_init is not None,
               micro_pointers=d.pointer_style == "micro",
               use_locality=bool(cfg.locality_prior) and d.pointer_style != "micro")


class _Source(NamedTuple):
  """Where choices come from: ``rng`` (sample) or ``forced`` (score a given arc,
  padded by ``max_choices`` so that a bit run can be sliced at any token)."""

  rng: Optional[jax.Array]
  forced: Optional[jax.Array]

  def bits(self, t, token, log_p1, width):
    if self.rng is not None:
      u = jax.random.uniform(jax.random.fold_in(self.rng, t), (width,))
      return (u < jnp.exp(log_p1)).astype(jnp.int32)
    return jax.lax.dynamic_slice(self.forced, (jnp.maximum(token, 0),), (width,))

  def choice(self, t, tok, logits):
    if self.rng is not None:
      return jax.random.categorical(jax.random.fold_in(self.rng, t), logits).astype(jnp.int32)
    return self.forced[tok]


def _store_anchor(params, prog: _Program, st: _Step, anchors, anchor_w, top):
  """Stores the node's anchor and attention key, before a pointer at the same
  step reads them: the current node's own slot is masked anyway (only j < i is
  valid). A new cell starts from fresh (zero) anchors; a zero-anchor step stores
  zeros but keeps its attention key."""
  if prog.use_new_cell:
    anchors = jnp.where(st.new_cell, 0.0, anchors)
    anchor_w = jnp.where(st.new_cell, 0.0, anchor_w)
  stored = top
  if prog.use_zero_anchor:
    stored = jnp.where(st.zero_anchor, 0.0, top)
  anchors = anchors.at[st.node].set(jnp.where(st.write_anchor, stored, anchors[st.node]))
  anchor_w = anchor_w.at[st.node].set(
      jnp.where(st.write_anchor, top @ params["w_attn_1"], anchor_w[st.node]))
  return anchors, anchor_w


def _logits(params, prog: _Program, st: _Step, anchor_w, top, choice_ids):
  """The step's logits over ``max_choices`` before masking: both heads are
  computed and one selected (the controller stays free of lax.switch so that
  vmap over keys or arcs stays a plain batch), then temperature, tanh constant,
  locality prior and op offset."""
  cfg = prog.cfg
  is_op, is_ptr = st.kind == OP, st.kind == POINTER
  op_raw = top @ (params["w_emb"].T if cfg.tie_op_logits else params["w_soft"])
  if prog.use_b_soft:
    op_raw = op_raw + params["b_soft"][0]
  op_logits = _pad(op_raw, prog.width)
  query = top @ params["w_attn_2"]
  ptr_logits = _pad((jnp.tanh(anchor_w + query) @ params["v_attn"])[:, 0], prog.width)
  logits = jnp.where(jnp.logical_or(is_ptr, st.kind == BITS), ptr_logits, op_logits)
  if cfg.use_temperature:
    logits = logits / float(cfg.temperature)
  if cfg.use_tanh:
    tanh_c = float(cfg.tanh_constant)
    if float(cfg.op_tanh_reduce) != 1.0:
      tanh_c = jnp.where(is_op, tanh_c / float(cfg.op_tanh_reduce), tanh_c)
    logits = tanh_c * jnp.tanh(logits)
  if prog.use_locality:
    dist = (st.node - choice_ids).astype(jnp.float32)
    logits = jnp.where(is_ptr, logits - dist * dist / 6.0, logits)
  if prog.use_op_offset:
    logits = jnp.where(is_op, logits + st.op_offset, logits)
  return logits


class _Bits(NamedTuple):
  bits: jax.Array  # int32 [max_choices], 0 where invalid
  valid: jax.Array  # bool [max_choices]
  log_prob: jax.Array
  ent_sampled: jax.Array
  ent_full: jax.Array
  logits: jax.Array  # the bit scores q' (NEG_LOGIT where invalid)


def _skip_bits(prog: _Program, st: _Step, logits, choice_ids, src: _Source) -> _Bits:
  """A BITS step (skip connections): bit j ~ Bernoulli(sigmoid(2 q'_j)) for j <
  num_choices, q' the attention score after temperature and tanh (the
  original's 2-way softmax over [-q', q']); sampled or read from the forced arc."""
  bit_valid = jnp.logical_and(choice_ids < st.num_choices, st.kind == BITS)
  bit_q = logits
  log_p1, log_p0 = jax.nn.log_sigmoid(2.0 * bit_q), jax.nn.log_sigmoid(-2.0 * bit_q)
  bits = src.bits(st.t, st.token, log_p1, prog.width)
  bits = jnp.where(bit_valid, bits, 0)
  lp_bits = jnp.where(bits == 1, log_p1, jnp.where(bits == 0, log_p0, NEG_LOGIT))
  lp_bits = jnp.sum(jnp.where(bit_valid, lp_bits, 0.0))
  p1 = jnp.exp(log_p1)
  ent_full = -jnp.sum(jnp.where(bit_valid, p1 * log_p1 + (1 - p1) * log_p0, 0.0))
  lp_each = jnp.where(bits == 1, log_p1, log_p0)
  ent_sampled = -jnp.sum(jnp.where(bit_valid, jnp.exp(lp_each) * lp_each, 0.0))
  return _Bits(bits, bit_valid, lp_bits, ent_sampled, ent_full,
               jnp.where(bit_valid, bit_q, NEG_LOGIT))


class _Choice(NamedTuple):
  choice: jax.Array  # int32: the op or the pointed-to node
  tok: jax.Array  # the arc position written (0 for steps that write none)
  log_prob: jax.Array  # of the choice (NEG_LOGIT when out of range)
  ent_full: jax.Array  # categorical entropy of the step
  logits: jax.Array  # masked: NEG_LOGIT for invalid choices


def _categorical(prog: _Program, st: _Step, logits, choice_ids, is_decision,
                 src: _Source) -> _Choice:
  """An OP or POINTER step: the softmax over the valid choices, and the choice
  (sampled, or read from the forced arc)."""
  valid = jnp.logical_and(choice_ids < st.num_choices, is_decision)
  logits = jnp.where(valid, logits, NEG_LOGIT)
  log_p = jax.nn.log_softmax(logits)
  tok = jnp.maximum(st.token, 0)  # ANCHOR steps have token -1
  choice = src.choice(st.t, tok, logits)
  # Gathers clamp indices, so an invalid (forced) choice cannot read outside a
  # buffer; it is scored NEG_LOGIT explicitly, since a clamped index could land
  # on a valid choice.
  in_range = jnp.logical_and(choice >= 0, choice < st.num_choices)
  lp_choice = jnp.where(in_range, log_p[jnp.clip(choice, 0, prog.width - 1)], NEG_LOGIT)
  p_all = jnp.exp(log_p)
  # where(), not a product with a mask: masked entries must contribute exactly
  # 0 to the entropy, and the ANCHOR step (all masked) must contribute nothing.
  full = -jnp.sum(jnp.where(valid, p_all * log_p, 0.0))
  return _Choice(choice, tok, lp_choice, full, logits)


def _accumulate(prog: _Program, carry: _Carry, is_decision, ch: _Choice, b: _Bits):
  """Adds the step's log-probability and entropies and writes its tokens (the
  choice at ``tok``; the bit run at ``[tok, tok + max_choices)``, untouched
  where invalid). Returns ``(arc, log_prob, ent_sampled, ent_full)``."""
  log_prob = carry.log_prob + jnp.where(is_decision, ch.log_prob, 0.0) + b.log_prob
  ent_s = (carry.ent_sampled + jnp.where(is_decision, -jnp.exp(ch.log_prob) * ch.log_prob, 0.0)
           + b.ent_sampled)
  ent_f = carry.ent_full + jnp.where(is_decision, ch.ent_full, 0.0) + b.ent_full
  arc = carry.arc.at[ch.tok].set(jnp.where(is_decision, ch.choice, carry.arc[ch.tok]))
  old = jax.lax.dynamic_slice(arc, (ch.tok,), (prog.width,))
  arc = jax.lax.dynamic_update_slice(arc, jnp.where(b.valid, b.bits, old), (ch.tok,))
  return arc, log_prob, ent_s, ent_f


def _next_input(params, prog: _Program, st: _Step, anchors, g_emb, choice, bits):
  """The next step's LSTM input: ``w_emb[op]`` after an op, the chosen anchor
  after a pointer (PTB-style: divided by ``0.1 + (i - j)``), the mean of the
  chosen anchors after skip bits ((bits . anchors) / (1 + #skips); ``g_emb``
  when there are no bits to choose, the first layer), ``g_emb`` after an anchor."""
  is_op, is_ptr, is_bits = st.kind == OP, st.kind == POINTER, st.kind == BITS
  emb = params["w_emb"][jnp.clip(choice, 0, prog.num_ops - 1)]
  j = jnp.clip(choice, 0, prog.num_nodes - 1)
  if prog.micro_pointers:
    ptr_in = anchors[j]
  else:
    denom = jnp.where(is_ptr, 0.1 + (st.node - j).astype(jnp.float32), 1.0)
    ptr_in = anchors[j] / denom
  bitsf = bits[:prog.num_nodes].astype(jnp.float32)
  skip_in = (bitsf @ anchors) / (1.0 + bitsf.sum())
  x = jnp.where(is_op, emb, jnp.where(is_ptr, ptr_in, g_emb))
  return jnp.where(jnp.logical_and(is_bits, st.num_choices > 0), skip_in, x)


def _program_step(params, prog: _Program, src: _Source, carry: _Carry, st: _Step):
  """One step of the program: LSTM, anchor, logits, the choice (or the skip
  bits), the running sums, the next input. Returns the new carry and the step's
  final logits (bit scores for a BITS step)."""
  is_decision = jnp.logical_or(st.kind == OP, st.kind == POINTER)
  choice_ids = jnp.arange(prog.width, dtype=jnp.int32)
  # The state is carried through every step, anchors included (melodyguan
  # commit 2d0cd4b fixed an earlier version that did not).
  c, h = _lstm_stack(params["w_lstm"], carry.x, carry.c, carry.h)
  top = h[-1]
  anchors, anchor_w = _store_anchor(params, prog, st, carry.anchors, carry.anchor_w, top)
  logits = _logits(params, prog, st, anchor_w, top, choice_ids)
  b = _skip_bits(prog, st, logits, choice_ids, src)
  ch = _categorical(prog, st, logits, choice_ids, is_decision, src)
  arc, log_prob, ent_s, ent_f = _accumulate(prog, carry, is_decision, ch, b)
  x = _next_input(params, prog, st, anchors, params["g_emb"][0], ch.choice, b.bits)
  new = _Carry(c, h, x, anchors, anchor_w, arc, log_prob, ent_s, ent_f)
  return new, jnp.where(st.kind == BITS, b.logits, ch.logits)


def _check_params(params, prog: _Program):
  if not prog.cfg.tie_op_logits and "w_soft" not in params:
    raise ValueError(
        "controller: the parameters have no 'w_soft' (they were built with tie_op_logits=True); "
        "use the same controller config (controller.tie_op_logits) to init and to run.")
  if prog.use_b_soft and "b_soft" not in params:
    raise ValueError(
        "controller: this decision program has a learned op bias (op_bias_init) but the "
        "parameters have no 'b_soft'; build them with controller.init for this program.")


def _steps(d: Decisions, prog: _Program) -> _Step:
  """The program as scanned inputs (int32/bool arrays of length num_steps)."""
  return _Step(
      t=jnp.arange(d.num_steps, dtype=jnp.int32),
      kind=jnp.asarray(np.asarray(d.kind), jnp.int32),
      node=jnp.asarray(np.asarray(d.node), jnp.int32),
      num_choices=jnp.asarray(np.asarray(d.num_choices), jnp.int32),
      token=jnp.asarray(np.asarray(d.token), jnp.int32),
      write_anchor=jnp.asarray(np.asarray(d.write_anchor), jnp.bool_),
      new_cell=jnp.asarray(d.step_new_cell, jnp.bool_) if prog.use_new_cell else None,
      zero_anchor=jnp.asarray(d.step_zero_anchor, jnp.bool_) if prog.use_zero_anchor else None,
      op_offset=(jnp.asarray(np.pad(d.step_op_offset,
                                    ((0, 0), (0, prog.width - prog.num_ops))), jnp.float32)
                 if prog.use_op_offset else None))


def _run(params: dict,
         decisions: Decisions,
         cfg: ControllerConfig,
         rng: Optional[jax.Array] = None,
         forced_arc: Optional[jax.Array] = None) -> tuple[dict, jax.Array]:
  """Runs the decision program once: samples (``rng``) or scores ``forced_arc``.

  Exactly one of ``rng`` / ``forced_arc`` must be given. Returns
  ``(out, step_logits)``: ``out`` holds ``arc`` (int32 ``[arc_length]``),
  ``log_prob``, ``entropy``, ``entropy_sampled``, ``entropy_full``;
  ``step_logits`` is ``[num_steps, max_choices]``, the final logits of each
  step (after temperature, tanh, locality prior and op offset; invalid
  choices, and every choice of an ANCHOR step, hold :data:`NEG_LOGIT`).
  One ``lax.scan`` of :func:`_program_step` over the program's steps.
  """
  if (rng is None) == (forced_arc is None):
    raise ValueError("_run: give exactly one of rng (sample) or forced_arc (score).")
  validate_decisions(decisions)
  d = decisions
  prog = _Program.of(d, cfg)
  sampling = rng is not None
  if not sampling:
    forced_arc = jnp.asarray(forced_arc).astype(jnp.int32)
    if forced_arc.shape != (d.arc_length,):
      raise ValueError(
          f"controller: arc of shape {forced_arc.shape}, expected ({d.arc_length},).")
  src = _Source(rng=rng, forced=None if sampling else jnp.pad(forced_arc, (0, prog.width)))
  _check_params(params, prog)

  s, layers = int(cfg.lstm_size), int(cfg.lstm_layers)
  zero = jnp.zeros((), jnp.float32)
  carry0 = _Carry(
      c=jnp.zeros((layers, s), jnp.float32),
      h=jnp.zeros((layers, s), jnp.float32),
      x=params["g_emb"][0],
      anchors=jnp.zeros((prog.num_nodes, s), jnp.float32),
      anchor_w=jnp.zeros((prog.num_nodes, s), jnp.float32),
      arc=jnp.zeros((d.arc_length + prog.width,), jnp.int32),
      log_prob=zero, ent_sampled=zero, ent_full=zero)
  carry, step_logits = jax.lax.scan(
      functools.partial(_program_step, params, prog, src), carry0, _steps(d, prog))
  arc = carry.arc[:d.arc_length]
  log_prob = carry.log_prob
  fixed = _fixed_tokens(d)
  if fixed and not sampling:  # sampled arcs hold 0 there (the buffer starts at 0)
    off = jnp.asarray(fixed, jnp.int32)
    log_prob = log_prob + jnp.sum(jnp.where(forced_arc[off] != 0, NEG_LOGIT, 0.0))
  ent_s = jax.lax.stop_gradient(carry.ent_sampled)
  ent_f = jax.lax.stop_gradient(carry.ent_full)
  out = {
      "arc": arc,
      "log_prob": log_prob,
      "entropy": ent_s if cfg.entropy_mode == "sampled" else ent_f,
      "entropy_sampled": ent_s,
      "entropy_full": ent_f,
  }
  return out, step_logits


def sample(params: dict, rng: jax.Array, decisions: Decisions, cfg: ControllerConfig) -> dict:
  """Samples one arc.

  Returns ``dict(arc=int32[arc_length], log_prob, entropy, entropy_sampled,
  entropy_full)`` (scalars float32). Pure and traceable; ``decisions`` and
  ``cfg`` are Python constants, so jit it by closing over them (see
  :func:`make_sampler`). The decision at step ``t`` uses
  ``jax.random.fold_in(rng, t)``.
  """
  return _run(params, decisions, cfg, rng=rng)[0]


def sample_many(params: dict, rng: jax.Array, decisions: Decisions, cfg: ControllerConfig,
                n: int) -> dict:
  """Samples ``n`` arcs with independent keys (``vmap`` over ``split(rng, n)``).

  Same dict as :func:`sample`, each entry with a leading axis of size ``n``.
  """
  keys = jax.random.split(rng, int(n))
  return jax.vmap(lambda k: sample(params, k, decisions, cfg))(keys)


def log_prob(params: dict, arc: jax.Array, decisions: Decisions, cfg: ControllerConfig) -> dict:
  """Scores a given arc with the same code path as :func:`sample`.

  Returns the same dict as :func:`sample` (``arc`` echoes the input).
  ``log_prob`` is differentiable w.r.t. ``params``; the entropies are
  stop-gradient. The arc is not validated on the device (validate it on the
  host first): each out-of-range token adds :data:`NEG_LOGIT` to
  ``log_prob``.
  """
  return _run(params, decisions, cfg, forced_arc=arc)[0]


def step_logits(params: dict, arc: jax.Array, decisions: Decisions,
                cfg: ControllerConfig) -> jax.Array:
  """The per-step logits ``[num_steps, max_choices]`` seen while scoring ``arc``.

  These are the final logits (after temperature, tanh constant, locality
  prior and op offset) that the step's softmax uses; invalid choices and ANCHOR steps hold
  :data:`NEG_LOGIT`. Differentiable; meant for extra controller losses (e.g. a
  skip penalty) and for tests.
  """
  return _run(params, decisions, cfg, forced_arc=arc)[1]


def make_sampler(decisions: Decisions, cfg: ControllerConfig) -> Callable[[dict, jax.Array], dict]:
  """A jitted ``fn(params, rng) -> sample dict`` for this program and config.

  One compilation serves every key and every parameter value of the same
  shapes (pass JAX arrays: a numpy argument is a separate cache entry).
  """
  return jax.jit(functools.partial(sample, decisions=decisions, cfg=cfg))


def make_log_prob(decisions: Decisions, cfg: ControllerConfig) -> Callable[[dict, jax.Array], dict]:
  """A jitted ``fn(params, arc) -> log_prob dict`` for this program and config.

  Pass the arc as an ``int32`` JAX array: another dtype or a numpy array is a
  new cache entry.
  """
  return jax.jit(functools.partial(log_prob, decisions=decisions, cfg=cfg))
