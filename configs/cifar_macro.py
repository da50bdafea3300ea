"""ENAS macro search on CIFAR-10: search a whole convolutional network layer by
layer (an op per layer, skip connections to earlier layers), derive it, train it
from scratch.

Variants (``--config=configs/cifar_macro.py:VARIANT``):

* ``search`` (default): the seed's ``cifar10_macro_search.sh`` (12 layers,
  36 channels, batch 128, 310 epochs, 45k/5k split), then derive.
* ``final``: train one arc from scratch (default: the paper's 24-layer arc,
  ``--config.arc=paper``; or ``--config.arc="..."`` / ``--config.arc_file=PATH``)
  as ``cifar10_macro_final.sh`` (96 channels doubling at the two reductions,
  batch 100, 310 epochs on all 50,000 images), with true separable
  convolutions and working pooling ops (the original had neither).
* ``smoke``: search -> derive -> final on generated images in a few minutes.

Shared fields and their sources: ``enas_jax/config_base.py``. Differences from
the original that change numbers: the search child runs the *sampled* op (the
original always ran max pool); gradients are really clipped.
"""

from enas_jax import config_base

VARIANTS = ("search", "final", "smoke")


def _search(c):
  c.space.num_layers = 12  # search script 12; paper 12
  c.child.out_filters = 36  # search script 36
  c.data.batch_size = 128  # search script 128
  c.child.keep_prob = 0.9  # search script 0.9
  c.child.l2_reg = 2.5e-4  # search script 2.5e-4; paper 1e-4
  c.child.lr_min = 5e-4  # search script 5e-4; paper 1e-3
  c.controller.tanh_constant = 1.5  # search script 1.5; paper 2.5
  c.controller.lr = 1e-3  # search script 1e-3; paper 3.5e-4
  c.controller.num_aggregate = 20  # search script 20
  c.controller.train_steps = 50  # search script 50 (1,000 arcs per phase)
  c.search.num_epochs = 310  # search script 310; paper 310
  return c


def _final(c):
  c.mode = "final"  # train one fixed arc from scratch
  c.arc = "paper"  # the 24-layer arc of cifar10_macro_final.sh
  c.space.num_layers = 24  # final script 24
  c.child.out_filters = 96  # final script 96 (192, 384 after the reductions)
  c.data.batch_size = 100  # final script 100
  c.data.num_valid = 0  # final script: all 50,000 training images, no validation
  c.child.keep_prob = 0.5  # final script 0.5
  c.child.l2_reg = 2e-4  # final script 2e-4; paper 1e-4
  c.child.lr_min = 1e-3  # final script 1e-3; paper 1e-3
  c.final.num_epochs = 310  # final script 310
  return c


def _smoke(c):
  c = config_base.cifar_smoke(c)
  c.space.num_layers = 6  # reductions after layers 1 and 3
  return c


def get_config(variant: str = "search"):
  variant = variant or "search"
  if variant not in VARIANTS:
    raise ValueError(f"configs/cifar_macro.py: unknown variant {variant!r}; choose one of "
                     f"{VARIANTS}.")
  c = _search(config_base.cifar("cifar_macro"))
  c.variant = variant
  if variant == "search":  # the derived arc keeps the search's num_layers (its length)
    c.search.final_recipe = config_base.final_recipe(
        c, _final(_search(config_base.cifar("cifar_macro"))), exclude=("space.num_layers",))
  if variant == "final":
    c = _final(c)
  elif variant == "smoke":
    c = _smoke(c)
  c.lock()
  return c
