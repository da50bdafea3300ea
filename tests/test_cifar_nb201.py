"""The NAS-Bench-201 cell space: codec and benchmark strings, the shared child
against the fixed child (values, statistics, gradients), one compilation for
every arc, the published network's parameter counts, the config, and the
pipeline end to end on a tiny config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_in_one_compile
from enas_jax import controller as ctrl
from enas_jax import spaces
from enas_jax.spaces import cifar_nb201 as nb
from enas_jax.spaces import cifar_nb201_child as ch

N_IMG, HW = 4, 8
TINY = {"cells_per_stage": 1, "out_filters": 4}
# node 1 = zero (its one edge is none); node 2 = conv1x1(0) + conv3x3(node 1: runs
# on the zeros); node 3 = skip(0) + avg_pool(1) + conv3x3(2): every op, a zero node.
EVERY_OP = np.asarray([0, 2, 3, 1, 4, 3], np.int32)


def _images(seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(N_IMG, HW, HW, 3)), jnp.float32)


def _labels():
  return jnp.arange(N_IMG) % 10


def _ce(logits):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), _labels()[:, None], 1))


# ------------------------------------------------------------------ codec
def test_codec_round_trip_and_benchmark_strings():
  c = nb.NB201Codec()
  assert c.arc_length == 6 and c.edges == ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
  for i in range(20):
    a = np.asarray(c.sample_uniform(jax.random.key(i)))
    assert np.array_equal(c.parse(c.format(a)), a)
    s = c.to_nb201_string(a)
    assert np.array_equal(c.from_nb201_string(s), a)
    assert np.array_equal(c.parse(s), a)  # parse reads the benchmark's form too
  # The benchmark's ResNet cell, token by token in its edge order.
  assert c.format(c.from_nb201_string(nb.RESNET_ARC)) == "3 0 3 1 0 1"
  assert c.to_nb201_string([3, 0, 3, 1, 0, 1]) == nb.RESNET_ARC
  assert "node 1 = zero" in c.describe([0, 1, 1, 1, 1, 1])
  assert nb.sizes_for_length(6) == {"num_nodes": 4}
  with pytest.raises(ValueError, match="n\\(n-1\\)/2"):
    nb.sizes_for_length(5)
  with pytest.raises(ValueError, match="wrong arc length 3; a cell of 4 nodes has .* 6 edges"):
    c.parse("0 1 2")


@pytest.mark.parametrize("arc, match", [
    ([0, 1, 2], "wrong arc length 3"),
    ([0, 1, 2, 3, 4, 5], "token 5 \\(edge 3<-2\\) is 5; allowed 0..4"),
    ([0, 1, 2, 3, 4, -1], "negative"),
    ("0 1 2 3 4 0", "use space.parse"),
])
def test_codec_rejects_bad_arcs(arc, match):
  with pytest.raises(ValueError, match=match):
    nb.NB201Codec().validate(arc)


@pytest.mark.parametrize("text, match", [
    ("|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|", "2 node group"),
    ("|nor_conv_3x3~0|+|none~0|nor_conv_3x3~0|+|a~0|b~1|c~2|", "should read 'op~1'"),
    ("|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|", "unknown op 'conv'"),
    ("|none~0|+|none~0|+|none~0|none~1|none~2|", "lists 1 edge"),
    ("none~0+|none~0|none~1|+|none~0|none~1|none~2|", "not of the form"),
])
def test_benchmark_string_errors(text, match):
  with pytest.raises(ValueError, match=match):
    nb.NB201Codec().from_nb201_string(text)


def test_registered_and_the_controller_samples_valid_arcs():
  assert "cifar_nb201" in spaces.names()
  c = spaces.get("cifar_nb201")
  d = c.decisions
  assert d.num_steps == 6 and set(d.kind.tolist()) == {0} and d.token.tolist() == list(range(6))
  cfg = ctrl.ControllerConfig(lstm_size=8, lstm_layers=2, temperature=5.0, tanh_constant=2.5,
                              entropy_mode="full")
  params = ctrl.init(jax.random.key(0), d, cfg)
  sample = ctrl.make_sampler(d, cfg)
  arcs = [np.asarray(sample(params, jax.random.key(i))["arc"]) for i in range(8)]
  for a in arcs:
    c.validate(a)
  assert len({tuple(a) for a in arcs}) > 1


# ------------------------------------------------------------ children
class _Arc:
  """A numpy arc as a hashable static argument of jit."""

  def __init__(self, a):
    self.a = np.asarray(a)

  def __hash__(self):
    return hash(self.a.tobytes())

  def __eq__(self, other):
    return np.array_equal(self.a, other.a)


def _loss(cfg, shared):
  def loss(params, stats, arc, x):
    arc = arc.a if isinstance(arc, _Arc) else arc
    f = ch.apply_shared if shared else ch.apply_fixed
    logits, aux, ns = f(params, stats, arc, x, train=True, key=None, cfg=cfg)
    assert aux is None
    return _ce(logits), (logits, ns)
  return loss


_SHARED = {}
_INIT = {}


def _cfg(mode):
  return ch.NB201ChildConfig(**TINY, op_select=mode, kernels="cpu" if mode == "switch" else "xla")


def _init_shared(cfg):
  """``init_shared`` in one compile (conftest.init_in_one_compile: eagerly on the
  default key it took over a minute), kept per config for the module."""
  if cfg not in _INIT:
    _INIT[cfg] = init_in_one_compile(ch.init_shared, cfg)
  return _INIT[cfg]


def _shared(mode):
  """The traced value-and-grad of one op_select mode (jitted once) and its
  results on each arc (built on first use, kept for the module)."""
  if mode not in _SHARED:
    arcs = [EVERY_OP]  # every op, a zero node (a random arc would cost a fixed compile)
    x = _images()
    cfg = _cfg(mode)
    params, stats = _init_shared(cfg)
    f = jax.jit(jax.value_and_grad(_loss(cfg, True), has_aux=True))
    _SHARED[mode] = {"arcs": arcs, "x": x, "cfg": cfg, "params": params, "stats": stats, "f": f,
                     "res": [f(params, stats, jnp.asarray(a), x) for a in arcs]}
  return _SHARED[mode]


# The mask mode (every op runs, XLA's kernels) costs another compilation: slow.
MODES = ["switch", pytest.param("mask", marks=pytest.mark.slow)]


@pytest.mark.parametrize("mode", MODES)
def test_shared_equals_fixed_on_the_same_weights(mode):
  r = _shared(mode)
  cfg, params, stats, x = r["cfg"], r["params"], r["stats"], r["x"]
  for arc, ((loss_s, (logits_s, stats_s)), g_s) in zip(r["arcs"], r["res"]):
    fp, fs = ch.fixed_from_shared(params, stats, arc, cfg)
    fixed = jax.jit(jax.value_and_grad(_loss(cfg, False), has_aux=True), static_argnums=2)
    (loss_f, (logits_f, stats_f)), g_f = fixed(fp, fs, _Arc(arc), x)
    np.testing.assert_allclose(logits_s, logits_f, rtol=1e-4, atol=1e-5)
    # Moving statistics: the skeleton's as they are, the chosen ops' gathered.
    _, fs_new = ch.fixed_from_shared(params, stats_s, arc, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 fs_new, stats_f)
    # Gradients: the used weights' equal the fixed child's ...
    g_gather, _ = ch.fixed_from_shared(g_s, stats, arc, cfg)
    for k in ("stem", "reduce", "lastact", "fc"):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6),
                   g_gather[k], g_f[k])
    for cg, cf in zip(g_gather["cells"], g_f["cells"]):
      assert set(cg) == set(cf)
      for e in cg:
        np.testing.assert_allclose(cg[e]["w"], cf[e]["w"], rtol=1e-3, atol=1e-6)
    # ... and every other op's (the chosen edge's other conv, unchosen edges) is zero.
    for cell in g_s["cells"]:
      for name, op in (("conv1x1", nb.CONV1), ("conv3x3", nb.CONV3)):
        unused = np.asarray(arc) != op
        assert float(jnp.abs(cell[name]["w"][unused]).max(initial=0.0)) == 0.0
        assert float(jnp.abs(cell[name]["w"][~unused]).max(initial=1.0)) > 0.0


def test_shared_in_evaluation_mode_equals_fixed():
  r = _shared("switch")
  cfg, x = r["cfg"], r["x"]
  # Moving statistics that are not the initial ones, so that reading them matters.
  stats = r["res"][0][0][1][1]
  params = r["params"]
  for arc in r["arcs"]:
    # Jitted: two compiles (eagerly, ~70 small ones).
    logits_s, _, same = jax.jit(lambda p, s, a: ch.apply_shared(
        p, s, a, x, train=False, key=None, cfg=cfg))(params, stats, jnp.asarray(arc))
    fp, fs = ch.fixed_from_shared(params, stats, arc, cfg)
    logits_f, _, _ = jax.jit(lambda p, s: ch.apply_fixed(
        p, s, arc, x, train=False, key=None, cfg=cfg))(fp, fs)
    np.testing.assert_allclose(logits_s, logits_f, rtol=1e-4, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, same, stats)  # nothing moves


@pytest.mark.parametrize("mode", MODES)
def test_one_compilation_for_every_arc(mode):
  codec = nb.NB201Codec()
  r = _shared(mode)
  x = r["x"]
  for i in range(6):
    arc = codec.sample_uniform(jax.random.key(50 + i))
    loss, _ = r["f"](r["params"], r["stats"], arc, x)[0]
    assert np.isfinite(float(loss))
  assert r["f"]._cache_size() == 1


def _hand_count(arc, C=16, N=5, classes=10):
  """The published network's parameters, counted by hand: stem conv + BN, per
  stage N cells (each conv edge k*k*C*C + BN 2C), two residual blocks (3x3
  stride 2 + BN, 3x3 + BN, 1x1 shortcut without BN), head BN and linear + bias."""
  total = 3 * 3 * 3 * C + 2 * C
  for s in range(3):
    c = C * 2 ** s
    if s:
      ci = c // 2
      total += 9 * ci * c + 2 * c + 9 * c * c + 2 * c + ci * c
    per_cell = sum({2: c * c + 2 * c, 3: 9 * c * c + 2 * c}.get(int(op), 0) for op in arc)
    total += N * per_cell
  return total + 2 * 4 * C + 4 * C * classes + classes


@pytest.mark.parametrize("arc, published", [
    ([0] * 6, 73306),  # the benchmark's smallest CIFAR-10 network (0.0733 MB)
    ([3] * 6, 1531546),  # its largest (1.5315 MB)
    ([3, 0, 3, 1, 0, 1], None),  # the ResNet cell
    ([2, 4, 3, 1, 2, 0], None),
])
def test_parameter_count_of_the_published_network(arc, published):
  cfg = ch.NB201ChildConfig()  # C=16, N=5, 4 nodes
  params, _ = jax.eval_shape(lambda k: ch.init_fixed(k, cfg, np.asarray(arc)),
                             jax.random.key(0))
  n = ch.count_params(params)
  assert n == _hand_count(arc)
  if published is not None:
    assert n == published


def test_child_config_errors():
  with pytest.raises(ValueError, match="num_nodes must be an integer >= 2"):
    ch.NB201ChildConfig(num_nodes=1)
  with pytest.raises(ValueError, match="remat must be 'none' or 'cells'"):
    ch.NB201ChildConfig(remat="layers")
  cfg = _cfg("switch")
  params, stats = _init_shared(cfg)
  with pytest.raises(ValueError, match="shape \\(6,\\)"):
    ch.apply_shared(params, stats, jnp.zeros((5,), jnp.int32), _images(), train=True,
                    key=None, cfg=cfg)
  with pytest.raises(ValueError, match="concrete numpy arc"):
    ch.init_fixed(jax.random.key(0), cfg, jnp.zeros((6,), jnp.int32))
  with pytest.raises(ValueError, match="multiples of 4"):
    ch.apply_shared(params, stats, EVERY_OP, jnp.zeros((1, 6, 6, 3)), train=True, key=None,
                    cfg=cfg)


@pytest.mark.slow  # two eager gradients of the fixed child: ~20 s on the loaded 2-core machine
def test_remat_cells_gives_the_same_gradient():
  cfg = ch.NB201ChildConfig(**TINY)
  cfg_r = ch.NB201ChildConfig(**TINY, remat="cells")
  params, stats = ch.init_fixed(jax.random.key(0), cfg, EVERY_OP)
  g = jax.grad(lambda p, c: _loss(c, False)(p, stats, EVERY_OP, _images())[0])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               g(params, cfg), g(params, cfg_r))


# ------------------------------------------------------------ config, pipeline
def _config(variant="smoke", **overrides):
  from configs import cifar_nb201
  c = cifar_nb201.get_config(variant)
  c.unlock()
  c.data.source = "synthetic"
  c.data.num_train, c.data.num_valid, c.data.num_test = 64, 32, 32
  c.data.batch_size, c.data.eval_batch_size = 8, 16
  c.child.out_filters = 4
  c.controller.lstm_size = 8
  c.controller.train_steps, c.controller.num_aggregate = 2, 2
  c.search.num_epochs, c.search.steps_per_dispatch = 1, 4
  c.derive.num_samples, c.derive.valid_batches, c.derive.batch = 3, 1, 2
  c.final.num_epochs, c.final.steps_per_dispatch = 1, 4
  c.log_every, c.tensorboard = 4, False
  for k, v in overrides.items():
    node = c
    for p in k.split(".")[:-1]:
      node = node[p]
    node[k.split(".")[-1]] = v
  c.lock()
  return c


def test_config_variants():
  from configs import cifar_nb201
  s = cifar_nb201.get_config("search")
  assert (s.space.num_nodes, s.space.cells_per_stage, s.child.out_filters) == (4, 5, 16)
  assert "num_layers" not in s.space
  f = cifar_nb201.get_config("final")
  assert (f.data.batch_size, f.final.num_epochs, f.child.lr_max, f.child.lr_min) == (
      256, 200, 0.1, 0.0)
  r = s.search.final_recipe
  assert r.data.batch_size == 256 and r.child.lr_t0 == 200 and r.child.grad_clip_mode == "none"
  with pytest.raises(ValueError, match="unknown variant"):
    cifar_nb201.get_config("tiny")


@pytest.mark.slow
def test_search_derive_final_end_to_end(tmp_path):
  from enas_jax.train import run as run_lib
  out = run_lib.run(_config(), str(tmp_path))
  assert len(out["best_arc"].split()) == 6
  assert 0.0 <= out["final"]["test_acc"] <= 1.0


def test_final_arc_by_benchmark_string_by_name_and_bad(tmp_path):
  from enas_jax.train import run as run_lib
  for arc in (nb.RESNET_ARC, "resnet"):
    c = _config("final", arc=arc)
    _, a = run_lib.resolve_arc(c, spaces.build(c))
    assert a.tolist() == [3, 0, 3, 1, 0, 1]
  with pytest.raises(ValueError, match="token 0 \\(edge 1<-0\\) is 7"):
    run_lib.run(_config("final", arc="7 0 0 0 0 0"), str(tmp_path / "b"))
