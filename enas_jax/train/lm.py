"""Language-model task of the PTB space: data on the device, jitted child steps,
the controller's reward, validation and arc scoring.

Everything here is a pure function of explicit state;
:class:`LMTask` only holds static settings and the on-device data arrays, and
hands out jitted functions that a notebook can call as the CLI does.

Child state: ``{"params", "opt_state", "h", "step"}``. ``h`` is the recurrent
state carried from window to window (reset at the start of every epoch);
``step`` counts child updates and fixes the data position
(``step % num_batches``) and the randomness (``fold_in(key, step)``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from enas_jax import compile_cache, parallel
from enas_jax.data import ptb as ptb_data
from enas_jax.spaces import ptb_child as pc
from enas_jax.train import common

ArcSampler = Callable[[dict, jax.Array], jax.Array]  # (controller params, key) -> arc


def child_optimizer(lr: float, grad_clip: float) -> optax.GradientTransformation:
  """SGD with global-norm clipping; the learning rate is a hyperparameter in the
  state so that a step can scale it (``lr * len / bptt`` for variable windows)."""
  sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=lr)
  if grad_clip and grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(grad_clip), sgd)
  return optax.chain(optax.identity(), sgd)


class LMTask(common.DeviceData):
  """Static settings + device data for training and evaluating PTB children.

  The loops read ``metric`` (the validation metric, lower is better here),
  ``SUM_KEYS`` (what a train chunk sums) and :meth:`progress_metrics`.

  Args:
    config: the run's ConfigDict (sections ``data``, ``space``, ``child``).
    corpus: a ``Corpus`` (train/valid/test token ids).
    mesh: the device mesh; batches are sharded over its ``data`` axis.
    shared: True for the weight-shared search child, False for a fixed child.
  """

  metric = "ppl"
  higher_is_better = False
  item_name = "tokens"
  SUM_KEYS = ("loss", "ce", "grad_norm")

  def __init__(self, config, corpus, mesh, *, shared: bool, train_split: str = "train"):
    compile_cache.enable(config=config)  # notebooks too; a user-set cache dir stays
    self.config = config
    self.mesh = mesh
    self.shared = shared
    self.cc = pc.ChildConfig.from_config(config)
    if corpus.vocab_size > self.cc.vocab_size:
      raise ValueError(
          f"data.vocab_size = {self.cc.vocab_size} but the corpus has "
          f"{corpus.vocab_size} word types; set --config.data.vocab_size={corpus.vocab_size}.")
    d = config.data
    self.batch_size = int(d.batch_size)
    self.eval_batch_size = int(d.eval_batch_size)
    self.bptt = int(d.bptt)
    parallel.check_divisible(self.batch_size, mesh, "data.batch_size")
    parallel.check_divisible(self.eval_batch_size, mesh, "data.eval_batch_size")
    train = ptb_data.batchify(getattr(corpus, train_split), self.batch_size)
    valid = ptb_data.batchify(corpus.valid, self.eval_batch_size)
    self.num_batches = ptb_data.num_windows(train.shape[1], self.bptt)
    self.row_len = int(train.shape[1])
    # Variable-length BPTT (the corrected code's AWD-LSTM trick): each window's
    # length is random; it is padded to the smallest of a few fixed bucket
    # lengths (one compiled branch per bucket, never one compilation per length).
    self.random_bptt = bool(d.get("random_bptt", False))
    self.buckets = tuple(sorted(int(b) for b in d.get("bptt_buckets", ()) or ()))
    if self.random_bptt:
      if not self.buckets or self.buckets[-1] < 2:
        raise ValueError("data.random_bptt needs data.bptt_buckets, e.g. (20, 30, 35, 40, 45).")
      # Pad each row so that a window of the largest bucket never runs off the
      # end (dynamic_slice would clamp the start and shift the window).
      train = np.pad(train, ((0, 0), (0, self.buckets[-1] + 1)))
    self.average = bool(config.get("final", {}).get("average", False)) and not shared
    self.num_valid_windows = ptb_data.num_windows(valid.shape[1], self.bptt)
    self._set_data("train", parallel.shard_batch(train, mesh))
    self._set_data("valid", parallel.shard_batch(valid, mesh))
    self.corpus = corpus
    c = config.child
    self.lr = float(c.lr)
    self.tx = child_optimizer(self.lr, float(c.grad_clip))
    self.tokens_per_step = self.batch_size * self.bptt

  # ------------------------------------------------------------------ state
  @property
  def _rep(self):
    return parallel.replicated(self.mesh)

  def state_shardings(self) -> dict:
    """Shardings of the child state (a pytree prefix): all replicated but ``h``."""
    return {"params": self._rep, "opt_state": self._rep,
            "h": parallel.batch_sharding(self.mesh), "step": self._rep,
            "batch_stats": self._rep, "pos": self._rep,
            **({"avg": self._rep} if self.average else {})}

  def init_child(self, key: jax.Array) -> dict:
    """A fresh child state in its final shardings. The weights are generated
    tensor by tensor directly into their replicated layout (no host copy and no
    second device copy of the up to 2 GB of shared weights)."""
    init = pc.init_shared if self.shared else pc.init_fixed
    params = init(key, self.cc, sharding=self._rep)

    def rest(params):
      if self.shared:
        # Plain SGD keeps no per-weight state, so the optimizer state built on a
        # view serves every arc's view; a stateful optimizer would not.
        view = jax.eval_shape(lambda k: pc.init_fixed(k, self.cc), jax.random.key(0))
        opt_view = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), view)
      else:
        opt_view = params
      state = {
          "opt_state": self.tx.init(opt_view),
          "h": jnp.zeros((self.batch_size, self.cc.hidden_size), jnp.float32),
          "step": jnp.int32(0),
          "batch_stats": pc.init_batch_stats(self.cc),  # {} unless child.batch_norm
          "pos": jnp.int32(0),  # column of the next window (variable-length BPTT)
      }
      if self.average:
        # Iterate averaging (the corrected final recipe): a uniform running mean
        # of the weights from the step it is switched on; used for evaluation.
        state["avg"] = {"params": jax.tree_util.tree_map(jnp.zeros_like, params),
                        "n": jnp.int32(0), "active": jnp.bool_(False)}
      return state

    shardings = {k: v for k, v in self.state_shardings().items() if k != "params"}
    state = jax.jit(rest, out_shardings=shardings)(params)
    state["params"] = params
    return state

  def _window(self, data, col, length):
    x = jax.lax.dynamic_slice_in_dim(data, col, length, axis=1)
    y = jax.lax.dynamic_slice_in_dim(data, col + 1, length, axis=1)
    return x, y

  # ------------------------------------------------------------ child steps
  def train_step_fn(self, arc_static=None):
    """The pure child update ``(state, arc, key) -> (state, metrics)`` on the
    window at ``state["step"]``.

    With ``arc_static`` (a numpy arc) the arc is baked in (fixed child, or a
    fixed arc on the shared weights for benchmarks); otherwise ``arc`` is a
    traced int32 array and one compilation serves every arc.
    """
    cc, T, nb = self.cc, self.bptt, self.num_batches
    static = arc_static is not None
    shared = self.shared
    nan_step = int(self.config.get("debug", {}).get("inject_nan_at_step", -1))

    def update(state, arc, key, x, y, h0, length, lr_scale):
      params = state["params"]
      view = pc.gather(params, arc, cc) if shared else params
      (loss, aux), grads = jax.value_and_grad(pc.loss, has_aux=True)(
          view, arc, x, y, h0, key, cc, static, bn_stats=state.get("batch_stats", {}),
          length=length)
      if nan_step >= 0:  # fault injection for tests (config.debug)
        loss = jnp.where(state["step"] == nan_step, jnp.nan, loss)
      gnorm = optax.tree.norm(grads)
      updates, opt_state = self.tx.update(grads, state["opt_state"], view)
      if lr_scale is not None:  # lr * len / bptt: the loss is a per-token mean
        updates = jax.tree_util.tree_map(lambda u: u * lr_scale, updates)
      new_view = optax.apply_updates(view, updates)
      params = pc.scatter(params, arc, new_view, cc) if shared else new_view
      new_state = dict(state, params=params, opt_state=opt_state, h=aux["h"],
                       step=state["step"] + 1, batch_stats=aux["bn_stats"])
      if "avg" in state:
        a = state["avg"]
        n = a["n"] + a["active"].astype(jnp.int32)
        inv = jnp.where(a["active"], 1.0 / jnp.maximum(n, 1).astype(jnp.float32), 0.0)
        new_state["avg"] = dict(a, n=n, params=jax.tree_util.tree_map(
            lambda m, w: m + inv * (w - m), a["params"], params))
      metrics = {"loss": loss, "ce": aux["ce"], "grad_norm": gnorm,
                 "finite": jnp.isfinite(loss) & jnp.isfinite(gnorm)}
      return new_state, metrics

    def step_fn(state, arc, key):
      if static:
        arc = arc_static
      if not self.random_bptt:
        pos = state["step"] % nb
        h0 = jnp.where(pos == 0, 0.0, state["h"])
        x, y = self._window(self.train, pos * T, T)
        new_state, m = update(state, arc, key, x, y, h0, None, None)
        m["epoch_end"] = pos == nb - 1
        m["tokens"] = jnp.int32(T)
        return new_state, m
      k_len, key = jax.random.split(key)
      length, epoch_end = self.sample_length(k_len, state["pos"])
      h0 = jnp.where(state["pos"] == 0, 0.0, state["h"])

      def branch(tb):
        def run(operands):  # the arc is closed over: a static arc stays static
          st, k, ln = operands
          x, y = self._window(self.train, st["pos"], tb)
          return update(st, arc, k, x, y, h0, ln, ln.astype(jnp.float32) / T)
        return run

      bucket = jnp.sum(jnp.asarray(self.buckets) < length)
      new_state, m = jax.lax.switch(bucket, [branch(tb) for tb in self.buckets],
                                    (state, key, length))
      new_state["pos"] = jnp.where(epoch_end, 0, state["pos"] + length)
      m["epoch_end"] = epoch_end
      m["tokens"] = length
      return new_state, m

    return step_fn

  def count_params(self, params) -> int:
    return pc.count_params(params)

  def progress_metrics(self, prefix: str, sums: dict, n: int) -> dict:
    """The metrics a progress line reports from a chunk's sums."""
    m = {f"{prefix}/{k}": sums[k] / n for k in self.SUM_KEYS}
    m[f"{prefix}/ppl"] = math.exp(min(sums["ce"] / n, 50.0))
    return m

  def sample_length(self, key, pos):
    """The corrected code's random window length at cursor ``pos``.

    Base 35 (``data.bptt``) with probability 0.95, else half of it; length =
    integer part of a normal draw (sd 5) truncated at 2 sd; at most the largest
    bucket and the tokens left in the row. Returns (length, epoch_end): the
    epoch ends when fewer than 3 tokens would be left after this window.
    """
    k_base, k_len = jax.random.split(key)
    base = jnp.where(jax.random.uniform(k_base) < 0.95, self.bptt, self.bptt / 2.0)
    draw = base + 5.0 * jax.random.truncated_normal(k_len, -2.0, 2.0)
    left = self.row_len - 1 - pos
    length = jnp.clip(jnp.floor(draw).astype(jnp.int32), 1, self.buckets[-1])
    length = jnp.minimum(length, left)
    return length, (left - length) < 3

  def make_train_chunk(self, sample_arc: ArcSampler | None = None, arc_static=None):
    """Jitted ``(state, ctrl_params, key, num_steps) -> (state, sums)``.

    Runs ``num_steps`` (a traced scalar: any count, one compilation) child
    updates in one dispatch; each step draws a fresh arc from
    ``sample_arc(ctrl_params, fold_in(key, step))`` unless ``arc_static`` is
    given. ``sums`` holds metric sums, the number of steps and the first step
    whose loss or gradient was not finite (``-1`` if none).
    """
    step_fn = self.train_step_fn(arc_static)

    def chunk(state, ctrl_params, key, num_steps):
      # Runs num_steps steps. With variable-length windows the number of steps
      # in an epoch (one pass over the data) is not known in advance, so the
      # chunk also stops at the epoch's end and the host runs the epoch-end work.
      def cond(carry):
        _, acc = carry
        more = acc["n"] < num_steps
        return more & ~acc["epoch_end"] if self.random_bptt else more

      def body(carry):
        st, acc = carry
        k = jax.random.fold_in(key, st["step"])
        k_arc, k_drop = jax.random.split(k)
        arc = None if arc_static is not None else sample_arc(ctrl_params, k_arc)
        step = st["step"]
        st, m = step_fn(st, arc, k_drop)
        bad = jnp.where((acc["first_bad"] < 0) & ~m["finite"], step, acc["first_bad"])
        acc = {"loss": acc["loss"] + m["loss"], "ce": acc["ce"] + m["ce"],
               "grad_norm": acc["grad_norm"] + m["grad_norm"], "n": acc["n"] + 1,
               "first_bad": bad, "epoch_end": m["epoch_end"],
               "tokens": acc["tokens"] + m["tokens"]}
        return st, acc

      zero = jnp.float32(0.0)
      acc0 = {"loss": zero, "ce": zero, "grad_norm": zero, "n": jnp.int32(0),
              "first_bad": jnp.int32(-1), "epoch_end": jnp.bool_(False), "tokens": jnp.int32(0)}
      return jax.lax.while_loop(cond, body, (state, acc0))

    # Pin the returned state's layout (params replicated, h batch-sharded):
    # otherwise sharding propagation from the batch-sharded data hands back the
    # embedding sharded along `data`, off its replicated layout, and the next
    # call, fed that state, compiles again.
    return self.jit(chunk, donate_argnums=(0,), out_shardings=(self.state_shardings(), self._rep))

  # ------------------------------------------------------------- evaluation
  def window_ce_fn(self, static_arc=None):
    """``(params, arc, col, h0, stats) -> (sum_ce, h)`` on the validation window
    at column ``col`` (``stats``: batch-norm moving statistics, ``{}`` if off)."""
    cc, T, shared = self.cc, self.bptt, self.shared

    def fn(params, arc, col, h0, stats=None):
      if static_arc is not None:
        arc = static_arc
      x, y = self._window(self.valid, col, T)
      view = pc.gather(params, arc, cc) if shared else params
      return pc.eval_ce_sum(view, arc, x, y, h0, cc, static_arc is not None, bn_stats=stats)

    return fn

  def reward_fn(self, reward_c: float):
    """The controller's reward: ``c / valid_ppl`` of one arc on one random
    validation window (zero initial state, no dropout), as in the original."""
    ce_fn = self.window_ce_fn()
    max_col = self.valid.shape[1] - self.bptt - 1
    n_tok = self.eval_batch_size * self.bptt

    def reward(arc, key, ctx):
      col = jax.random.randint(key, (), 0, max_col + 1)
      h0 = jnp.zeros((self.eval_batch_size, self.cc.hidden_size), jnp.float32)
      with self.using(ctx["data"]) if "data" in ctx else contextlib.nullcontext():
        sum_ce, _ = ce_fn(ctx["params"], arc, col, h0, ctx.get("batch_stats"))
      return reward_c / jnp.exp(sum_ce / n_tok)

    return reward

  def make_search_valid(self, sample_arc: ArcSampler, num_windows: int = 0):
    """Jitted ``(params, ctrl_params, key) -> ppl``: validation as the corrected
    search code does it, a freshly sampled arc and a zero state per window."""
    ce_fn = self.window_ce_fn()
    E = self.num_valid_windows if num_windows <= 0 else min(num_windows, self.num_valid_windows)
    n_tok = self.eval_batch_size * self.bptt

    def valid(params, ctrl_params, key, stats=None):
      def one(w):
        arc = sample_arc(ctrl_params, jax.random.fold_in(key, w))
        h0 = jnp.zeros((self.eval_batch_size, self.cc.hidden_size), jnp.float32)
        return ce_fn(params, arc, w * self.bptt, h0, stats)[0]
      sums = jax.lax.map(one, jnp.arange(E))
      return jnp.exp(sums.sum() / (E * n_tok))

    return self.jit(valid)

  def carried_ce(self, params, arc, num_windows: int, static_arc=None, stats=None):
    """Mean CE over the first ``num_windows`` validation windows, state carried."""
    ce_fn = self.window_ce_fn(static_arc)

    def body(h, w):
      s, h = ce_fn(params, arc, w * self.bptt, h, stats)
      return h, s

    h0 = jnp.zeros((self.eval_batch_size, self.cc.hidden_size), jnp.float32)
    _, sums = jax.lax.scan(body, h0, jnp.arange(num_windows))
    return sums.sum() / (num_windows * self.eval_batch_size * self.bptt)

  def make_score_arcs(self, num_windows: int = 0):
    """Jitted ``(params, arcs[K, A]) -> ppl[K]``: each arc's validation
    perplexity with the state carried across windows (derive)."""
    E = self.num_valid_windows if num_windows <= 0 else min(num_windows, self.num_valid_windows)

    def score(params, arcs, stats=None):
      return jnp.exp(jax.lax.map(lambda a: self.carried_ce(params, a, E, stats=stats), arcs))

    return self.jit(score)

  def make_fixed_valid(self, arc_static, num_windows: int = 0):
    """Jitted ``params -> ppl`` for a fixed arc: validation with carried state."""
    E = self.num_valid_windows if num_windows <= 0 else min(num_windows, self.num_valid_windows)
    return self.jit(lambda params, stats=None: jnp.exp(
        self.carried_ce(params, None, E, arc_static, stats)))

  def make_test_eval(self, arc_static, batch_size: int, bptt: int):
    """Jitted ``params -> ppl`` on the test split with the state carried across
    windows (batch 1 and bptt 1 are the corrected recipe's test setting).
    The whole pass is one ``lax.scan`` on the device."""
    test = ptb_data.batchify(self.corpus.test, batch_size)
    E = ptb_data.num_windows(test.shape[1], bptt)
    name = f"test_b{batch_size}"
    self._set_data(name, parallel.shard_batch(test, self.mesh))
    cc = self.cc

    def run(params, stats=None):
      def body(h, w):
        x, y = self._window(self.data_arrays[name], w * bptt, bptt)
        s, h = pc.eval_ce_sum(params, arc_static, x, y, h, cc, True, bn_stats=stats)
        return h, s
      h0 = jnp.zeros((batch_size, cc.hidden_size), jnp.float32)
      _, sums = jax.lax.scan(body, h0, jnp.arange(E))
      return jnp.exp(sums.sum() / (E * batch_size * bptt))

    return self.jit(run)
