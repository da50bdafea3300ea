"""``enas_jax.backend``: the documented implementation set per platform, config
forcing, and resolved configs that the children build from."""

import ml_collections
import pytest

from enas_jax import backend
from enas_jax.spaces import cifar_micro_child as mc


@pytest.mark.parametrize("platform,kernels,dtype", [
    ("cpu", "cpu", "float32"), ("gpu", "xla", "bfloat16"), ("tpu", "xla", "bfloat16"),
    ("cuda", "xla", "bfloat16"), ("rocm", "xla", "bfloat16")])
def test_auto_resolves_to_the_documented_set(platform, kernels, dtype):
  impl = backend.resolve(platform=platform)
  assert (impl.kernels, impl.compute_dtype, impl.op_select) == (kernels, dtype, "switch")
  assert impl.platform == backend.platform_name(platform)


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_explicit_values_win_over_the_platform(platform):
  impl = backend.resolve("cpu", "bfloat16", "mask", platform)
  assert (impl.kernels, impl.compute_dtype, impl.op_select) == ("cpu", "bfloat16", "mask")
  impl = backend.resolve("xla", "float32", platform=platform)
  assert (impl.kernels, impl.compute_dtype) == ("xla", "float32")


@pytest.mark.parametrize("args,match", [
    ({"kernels": "custom"}, "child.kernels"), ({"compute_dtype": "float16"}, "child.compute_dtype"),
    ({"op_select": "gather"}, "child.op_select"), ({"platform": "metal"}, "unknown platform")])
def test_bad_values_are_named(args, match):
  with pytest.raises(ValueError, match=match):
    backend.resolve(**args)


def _config(**child):
  c = ml_collections.ConfigDict()
  c.space = ml_collections.ConfigDict({"name": "cifar_micro", "num_layers": 3, "num_nodes": 2})
  c.child = ml_collections.ConfigDict(dict(
      {"out_filters": 4, "kernels": "auto", "compute_dtype": "auto", "op_select": "auto"},
      **child))
  c.lock()
  return c


def test_resolve_config_for_another_target_and_forcing():
  config = _config()
  tpu = backend.resolve_config(config, "tpu")
  assert backend.describe(tpu) == {"platform": "tpu", "kernels": "xla",
                                   "compute_dtype": "bfloat16", "op_select": "switch"}
  assert config.child.kernels == "auto" and "platform" not in config.child  # a copy
  assert tpu.is_locked
  # A child built from the resolved config on this (CPU) host is the TPU one.
  cfg = mc.MicroChildConfig.from_config(tpu)
  assert (cfg.platform, cfg.kernels, cfg.compute_dtype) == ("tpu", "xla", "bfloat16")
  # Forced values survive resolution on every platform.
  forced = backend.resolve_config(_config(kernels="cpu", compute_dtype="float32"), "gpu")
  assert (forced.child.kernels, forced.child.compute_dtype) == ("cpu", "float32")
  # Resolving twice changes nothing.
  assert backend.describe(backend.resolve_config(tpu, "tpu")) == backend.describe(tpu)
  cpu = backend.resolve_config(config, "cpu")
  assert (cpu.child.kernels, cpu.child.compute_dtype) == ("cpu", "float32")


def test_jnp_dtype():
  import jax.numpy as jnp
  assert backend.jnp_dtype("bfloat16") == jnp.bfloat16
  assert backend.jnp_dtype("float32") == jnp.float32
  with pytest.raises(ValueError, match="compute_dtype"):
    backend.jnp_dtype("auto")
