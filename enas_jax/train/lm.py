"""Language-model task of the PTB space: what differs from the image task
(:mod:`enas_jax.train.task` holds the rest): how a step draws its window, the
loss, and validation with the recurrent state carried across windows.

Data (``task.data``): ``train`` ``[batch_size, row_len]`` and ``valid``
``[eval_batch_size, cols]`` token ids, batch-sharded over ``data``. The child
state is an :class:`~enas_jax.train.state.LMChildState`: ``h`` is carried from
window to window (reset at the start of every epoch); ``step`` fixes the data
position (``step % num_batches``) and the randomness (``fold_in(key, step)``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from enas_jax import compile_cache, parallel
from enas_jax.data import ptb as ptb_data
from enas_jax.spaces import ptb_child as pc
from enas_jax.train import task as task_lib
from enas_jax.train.state import LMChildState


def child_optimizer(lr: float, grad_clip: float) -> optax.GradientTransformation:
  """SGD with global-norm clipping; the learning rate is a hyperparameter in the
  state so that a step can scale it (``lr * len / bptt`` for variable windows)."""
  sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=lr)
  if grad_clip and grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(grad_clip), sgd)
  return optax.chain(optax.identity(), sgd)


def window(tokens, col, length: int):
  """Inputs and targets (``[B, length]`` each) of the window at column ``col``."""
  x = jax.lax.dynamic_slice_in_dim(tokens, col, length, axis=1)
  y = jax.lax.dynamic_slice_in_dim(tokens, col + 1, length, axis=1)
  return x, y


class LMTask(task_lib.Task):
  """Static settings + device data for training and evaluating PTB children.

  Args:
    config: the run's ConfigDict (sections ``data``, ``space``, ``child``).
    corpus: a ``Corpus`` (train/valid/test token ids).
    mesh: the device mesh; batches are sharded over its ``data`` axis.
    shared: True for the weight-shared search child, False for a fixed child.
    settings: the run's typed loop settings (``final.average``); read from
      ``config`` when not given.
  """

  metric = "ppl"
  higher_is_better = False
  item_name = "tokens"
  SUM_KEYS = ("loss", "ce", "grad_norm")

  def __init__(self, config, corpus, mesh, *, shared: bool, train_split: str = "train",
               settings=None):
    super().__init__(config, mesh, shared=shared, settings=settings)
    compile_cache.enable(config=config)  # notebooks too; a user-set cache dir stays
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
    self.random_bptt = bool(d.random_bptt)
    self.buckets = tuple(sorted(int(b) for b in d.bptt_buckets or ()))
    if self.random_bptt:
      if not self.buckets or self.buckets[-1] < 2:
        raise ValueError("data.random_bptt needs data.bptt_buckets, e.g. (20, 30, 35, 40, 45).")
      # Pad each row so that a window of the largest bucket never runs off the
      # end (dynamic_slice would clamp the start and shift the window).
      train = np.pad(train, ((0, 0), (0, self.buckets[-1] + 1)))
    self.average = self.settings.final.average and not shared
    # A validation batch is one eval_batch_size x bptt window.
    self.num_valid_batches = ptb_data.num_windows(valid.shape[1], self.bptt)
    self.data = {"train": parallel.shard_batch(train, mesh),
                 "valid": parallel.shard_batch(valid, mesh), **self.scalar_data()}
    self.corpus = corpus
    self.lr = float(config.child.lr)
    self.tx = child_optimizer(self.lr, float(config.child.grad_clip))
    self.tokens_per_step = self.batch_size * self.bptt

  # ------------------------------------------------------------------ state
  def state_shardings(self) -> LMChildState:
    """All replicated but ``h`` (batch-sharded)."""
    rep = self.replicated
    return LMChildState(params=rep, opt_state=rep, step=rep, batch_stats=rep,
                        h=parallel.batch_sharding(self.mesh), pos=rep,
                        avg=rep if self.average else None)

  def init_child(self, key: jax.Array) -> LMChildState:
    """A fresh child state in its final shardings. The weights are generated
    tensor by tensor directly into their replicated layout (no host copy and no
    second device copy of the up to 2 GB of shared weights)."""
    init = pc.init_shared if self.shared else pc.init_fixed
    params = init(key, self.cc, sharding=self.replicated)

    def rest(params):
      if self.shared:
        # Plain SGD keeps no per-weight state, so the optimizer state built on a
        # view serves every arc's view; a stateful optimizer would not.
        view = jax.eval_shape(lambda k: pc.init_fixed(k, self.cc), jax.random.key(0))
        opt_view = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), view)
      else:
        opt_view = params
      avg = None
      if self.average:
        # Iterate averaging (the corrected final recipe): a uniform running mean
        # of the weights from the step it is switched on; used for evaluation.
        avg = {"params": jax.tree_util.tree_map(jnp.zeros_like, params),
               "n": jnp.int32(0), "active": jnp.bool_(False)}
      return LMChildState(
          params=None, opt_state=self.tx.init(opt_view), step=jnp.int32(0),
          batch_stats=pc.init_batch_stats(self.cc),  # {} unless child.batch_norm
          h=jnp.zeros((self.batch_size, self.cc.hidden_size), jnp.float32),
          pos=jnp.int32(0),  # column of the next window (variable-length BPTT)
          avg=avg)

    state = jax.jit(rest, out_shardings=self.state_shardings().replace(params=None))(params)
    return state.replace(params=params)

  # ------------------------------------------------------------- the step
  def view(self, params, arc, static):
    return pc.gather(params, arc, self.cc) if self.shared else params

  def merge(self, params, arc, new_view, static):
    return pc.scatter(params, arc, new_view, self.cc) if self.shared else new_view

  def loss(self, view, state, arc, batch, key, static):
    x, y, h0, length = batch
    loss, aux = pc.loss(view, arc, x, y, h0, key, self.cc, static, bn_stats=state.batch_stats,
                        length=length)
    return loss, ({"ce": aux["ce"]}, {"h": aux["h"], "batch_stats": aux["bn_stats"]})

  def after_update(self, state):
    if state.avg is None:
      return state
    a = state.avg
    n = a["n"] + a["active"].astype(jnp.int32)
    inv = jnp.where(a["active"], 1.0 / jnp.maximum(n, 1).astype(jnp.float32), 0.0)
    return state.replace(avg=dict(a, n=n, params=jax.tree_util.tree_map(
        lambda m, w: m + inv * (w - m), a["params"], state.params)))

  def run_step(self, state, data, arc, key, static):
    """Fixed windows: window ``step % num_batches``. Variable windows: a random
    length at ``state.pos``, padded to its bucket (one ``lax.switch`` branch
    per bucket), the learning rate scaled by ``length / bptt``."""
    T, nb = self.bptt, self.num_batches
    if not self.random_bptt:
      pos = state.step % nb
      h0 = jnp.where(pos == 0, 0.0, state.h)
      x, y = window(data["train"], pos * T, T)
      new_state, m = task_lib.apply_update(self, state, arc, key, (x, y, h0, None), static)
      return new_state, dict(m, epoch_end=pos == nb - 1, tokens=jnp.int32(T))
    k_len, key = jax.random.split(key)
    length, epoch_end = self.sample_length(k_len, state.pos)
    h0 = jnp.where(state.pos == 0, 0.0, state.h)

    def branch(tb):
      def run(operands):  # the arc is closed over: a static arc stays static
        st, k, ln = operands
        x, y = window(data["train"], st.pos, tb)
        return task_lib.apply_update(self, st, arc, k, (x, y, h0, ln), static,
                                     lr_scale=ln.astype(jnp.float32) / T)
      return run

    bucket = jnp.sum(jnp.asarray(self.buckets) < length)
    new_state, m = jax.lax.switch(bucket, [branch(tb) for tb in self.buckets],
                                  (state, key, length))
    new_state = new_state.replace(pos=jnp.where(epoch_end, 0, state.pos + length))
    return new_state, dict(m, epoch_end=epoch_end, tokens=length)

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

  def progress_metrics(self, prefix: str, sums: dict, n: int) -> dict:
    m = super().progress_metrics(prefix, sums, n)
    m[f"{prefix}/ppl"] = math.exp(min(sums["ce"] / n, 50.0))
    return m

  # ------------------------------------------------------------- evaluation
  def _zero_h(self, batch_size=None):
    return jnp.zeros((batch_size or self.eval_batch_size, self.cc.hidden_size), jnp.float32)

  def reward_value(self, data, params, batch_stats, arc, key, reward_c):
    """``c / valid_ppl`` of one arc on one random validation window (zero
    initial state, no dropout), as in the original."""
    max_col = data["valid"].shape[1] - self.bptt - 1
    col = jax.random.randint(key, (), 0, max_col + 1)
    sum_ce, _ = window_ce(self, data, params, arc, col, self._zero_h(), batch_stats)
    return reward_c / jnp.exp(sum_ce / (self.eval_batch_size * self.bptt))

  def valid_sum(self, data, params, batch_stats, arc, i):
    """Summed CE of validation window ``i`` with a zero state (search validation
    as the corrected code does it)."""
    return window_ce(self, data, params, arc, i * self.bptt, self._zero_h(), batch_stats)[0]

  def to_metric(self, total, num):
    return jnp.exp(total / (num * self.eval_batch_size * self.bptt))

  def score_arc(self, data, params, batch_stats, arc, num, static=False):
    """Perplexity over the first ``num`` windows, the state carried across them."""
    return jnp.exp(carried_ce(self, data, params, arc, num, static, batch_stats))

  def make_fixed_valid(self, arc_static, num_batches: int = 0):
    """Jitted ``(params, stats=None) -> ppl`` for a fixed arc over the first
    ``num_batches`` validation windows (0 = all), state carried."""
    fn = functools.partial(_fixed_valid, self, np.asarray(arc_static, np.int32),
                           self.num_units(num_batches))
    return self.jit(fn)

  def make_test_eval(self, arc_static, batch_size: int, bptt: int):
    """Jitted ``(params, stats=None) -> ppl`` on the test split with the state
    carried across windows (batch 1 and bptt 1 are the corrected recipe's test
    setting); one ``lax.scan`` on the device. Its data is its own (the test
    split batchified to ``batch_size``), passed as an argument."""
    test = parallel.shard_batch(ptb_data.batchify(self.corpus.test, batch_size), self.mesh)
    fn = jax.jit(functools.partial(split_ppl, self.cc, np.asarray(arc_static, np.int32), bptt))
    call = lambda params, stats=None: fn(test, params, stats)  # noqa: E731
    call._cache_size = fn._cache_size
    return call


# --------------------------------------------------------- evaluation functions
def window_ce(task: LMTask, data, params, arc, col, h0, stats=None, static: bool = False):
  """``(sum_ce, h)`` of the validation window at column ``col`` from state
  ``h0`` (no dropout); ``arc`` static (a numpy arc) when ``static``."""
  x, y = window(data["valid"], col, task.bptt)
  view = task.view(params, arc, static)
  return pc.eval_ce_sum(view, arc, x, y, h0, task.cc, static, bn_stats=stats)


def carried_ce(task: LMTask, data, params, arc, num: int, static: bool = False, stats=None):
  """Mean CE over the first ``num`` validation windows, state carried."""
  def body(h, w):
    s, h = window_ce(task, data, params, arc, w * task.bptt, h, stats, static)
    return h, s
  _, sums = jax.lax.scan(body, task._zero_h(), jnp.arange(num))
  return sums.sum() / (num * task.eval_batch_size * task.bptt)


def _fixed_valid(task, arc_static, num, data, params, stats=None):
  return task.score_arc(data, params, stats, arc_static, num, static=True)


def split_ppl(cc: pc.ChildConfig, arc_static, bptt: int, tokens, params, stats=None):
  """Perplexity of the fixed child over all windows of ``tokens`` (``[B, cols]``),
  the state carried across windows."""
  batch_size = tokens.shape[0]
  num = ptb_data.num_windows(tokens.shape[1], bptt)

  def body(h, w):
    x, y = window(tokens, w * bptt, bptt)
    s, h = pc.eval_ce_sum(params, arc_static, x, y, h, cc, True, bn_stats=stats)
    return h, s
  h0 = jnp.zeros((batch_size, cc.hidden_size), jnp.float32)
  _, sums = jax.lax.scan(body, h0, jnp.arange(num))
  return jnp.exp(sums.sum() / (num * batch_size * bptt))
