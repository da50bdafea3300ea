"""ENAS micro search on CIFAR-10: search a normal cell and a reduction cell,
stack them, train the result from scratch (the paper's best CIFAR-10 result:
2.89% error with cutout, 4.6M parameters).

Variants (``--config=configs/cifar_micro.py:VARIANT``):

* ``search`` (default; ``--config=configs/cifar_micro.py`` runs it): the seed's
  ``cifar10_micro_search.sh`` (6 layers + 2 reduction cells, 20 channels,
  5 nodes per cell, batch 160, 150 epochs, 45k/5k split), then derive.
* ``final``: train one pair of cells from scratch (default: the paper's,
  ``--config.arc=paper``) as ``cifar10_micro_final.sh`` (15 layers + 2
  reductions, 36 channels, batch 144, 630 epochs, drop-path 0.6, auxiliary head
  0.4) plus cutout 16, which the paper's 2.89% needs and no script set.
* ``smoke``: search -> derive -> final on generated images in a few minutes.

Shared fields and their sources: ``enas_jax/config_base.py``. Differences from
the original: the auxiliary head is trained (the original left its weights at
their initialisation); gradients are really clipped.
"""

from enas_jax import config_base

VARIANTS = ("search", "final", "smoke")


def _micro_fields(c):
  c.space.num_layers = 6  # normal layers; cells = num_layers + 2 (search script 6)
  c.space.num_nodes = 5  # nodes per cell B (scripts 5); the arc has 8B tokens
  c.child.out_filters = 20  # search script 20 (doubling at the two reductions)
  c.data.batch_size = 160  # search script 160
  c.child.keep_prob = 0.9  # search script 0.9
  c.child.l2_reg = 1e-4  # search script 1e-4; paper 1e-4
  c.child.lr_min = 5e-4  # search script 5e-4
  # Drop-path keep probability at the last cell, ramped linearly over training.
  # Final training only: the original's search accepted the flag (0.6) but never
  # applied it; so do we.
  c.child.drop_path_keep_prob = 0.6
  # Auxiliary classifier one cell after the second reduction cell (scripts: on).
  c.child.use_aux_heads = True
  # Weight of the auxiliary loss (original 0.4). Its head is trained here; the
  # original excluded its weights from the optimiser. As there, they get no L2.
  c.child.aux_weight = 0.4
  c.controller.tanh_constant = 1.1  # search script 1.1; paper 2.5
  c.controller.op_tanh_reduce = 2.5  # search script 2.5
  c.controller.entropy_mode = "full"  # the micro controller's true categorical entropy
  c.controller.lr = 3.5e-3  # search script 3.5e-3; paper 3.5e-4
  c.controller.num_aggregate = 10  # search script 10
  c.controller.train_steps = 30  # search script 30 (300 arcs per phase)
  c.controller.skip_weight = 0.0  # no skip decisions in the micro space
  c.search.num_epochs = 150  # search script 150
  # Final training's epochs (final script 630), here so that search.then_final
  # trains as long as the final variant.
  c.final.num_epochs = 630
  return c


def _final(c):
  c.mode = "final"  # train one fixed arc from scratch
  c.arc = "paper"  # the two cells of cifar10_micro_final.sh
  c.space.num_layers = 15  # final script 15 (17 cells)
  c.child.out_filters = 36  # final script 36
  c.data.batch_size = 144  # final script 144
  c.data.num_valid = 0  # final script: all 50,000 training images
  c.data.cutout_size = 16  # paper 16 (for 2.89%); final script: off
  c.child.keep_prob = 0.8  # final script 0.8
  c.child.l2_reg = 2e-4  # final script 2e-4; paper 1e-4
  c.child.lr_min = 1e-4  # final script 1e-4; paper 1e-3
  return c


def _smoke(c):
  c = config_base.cifar_smoke(c)
  c.space.num_layers = 3  # 5 cells: reductions at cells 1 and 3
  c.space.num_nodes = 5
  c.child.out_filters = 8
  return c


def get_config(variant: str = "search"):
  variant = variant or "search"
  if variant not in VARIANTS:
    raise ValueError(f"configs/cifar_micro.py: unknown variant {variant!r}; choose one of "
                     f"{VARIANTS}.")
  c = _micro_fields(config_base.cifar("cifar_micro"))
  c.variant = variant
  if variant == "search":  # the derived cells keep num_nodes; the stack takes final's 15 layers
    c.search.final_recipe = config_base.final_recipe(
        c, _final(_micro_fields(config_base.cifar("cifar_micro"))), exclude=("space.num_nodes",))
  if variant == "final":
    c = _final(c)
  elif variant == "smoke":
    c = _smoke(c)
  c.lock()
  return c

