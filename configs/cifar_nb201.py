"""ENAS on the NAS-Bench-201 cell space (Dong & Yang, ICLR 2020) on CIFAR-10:
search one 4-node cell (6 edges, 5 ops each: 15,625 cells), stack it as the
benchmark's network (C=16, N=5), train the result from scratch with the
benchmark's recipe, so that its accuracy compares with the benchmark's tables
(``NB201Codec.to_nb201_string`` gives the arc's key there).

Variants (``--config=configs/cifar_nb201.py:VARIANT``):

* ``search`` (default): the benchmark's ENAS baseline (its ``ENAS.sh`` and
  ``algos/ENAS.config``): shared network C=16, N=5, batch 128, 310 epochs,
  SGD lr 0.05 -> 5e-4, the CIFAR-10 training set split 25k/25k, the ENAS
  controller with the settings below; then derive.
* ``final``: train one cell from scratch with the benchmark's recipe
  (``hyper-opts/200E.config``): 200 epochs, batch 256, SGD Nesterov 0.9, lr 0.1
  cosine to 0, weight decay 5e-4, pad-crop and flip, all 50,000 training images
  (default arc: the benchmark's ResNet cell, ``--config.arc=resnet``).
* ``smoke``: search -> derive -> final on generated images in a few minutes.

Values: "benchmark" = NAS-Bench-201's published code (the AutoDL-Projects
repository: ``scripts-search/algos/ENAS.sh``, ``configs/nas-benchmark/``);
"ENAS" = the ENAS scripts (``enas_jax/config_base.py``). Weight decay: PyTorch's
``weight_decay = d`` adds ``d w`` to the gradient, our ``l2_reg`` adds
``l2_reg * sum(w^2)`` to the loss, so ``l2_reg = d / 2``.
"""

from enas_jax import config_base

VARIANTS = ("search", "final", "smoke")


def _nb201_fields(c):
  del c.space.num_layers  # not a size of this space (config_base.cifar's macro/micro field)
  c.space.num_nodes = 4  # nodes per cell, the input included (benchmark 4); arc: n(n-1)/2 tokens
  c.space.cells_per_stage = 5  # N, cells per stage; 3 stages (benchmark 5, search and final)
  c.child.out_filters = 16  # C, the first stage's channels, doubled twice (benchmark 16)
  c.child.keep_prob = 1.0  # no dropout in the benchmark's network (ENAS 0.9); unused here
  c.data.num_valid = 25000  # benchmark: its search splits the 50k training images in halves
  c.data.batch_size = 128  # benchmark ENAS.config 128 (ENAS micro script 160)
  c.child.l2_reg = 1.25e-4  # benchmark ENAS.config weight decay 2.5e-4 (= l2_reg 1.25e-4)
  c.child.lr_max = 0.05  # benchmark ENAS.config 0.05 (as ENAS)
  c.child.lr_min = 5e-4  # benchmark ENAS.config eta_min 5e-4 (as the ENAS scripts)
  # Benchmark ENAS.config: a cosine of T_max = 10 epochs never restarted (it
  # rises back over the next 10: period 20, per epoch); ours restarts (SGDR, T0
  # 10, Tmul 2, as the ENAS scripts; 310 epochs end a cycle).
  c.child.lr_t0 = 10
  c.child.lr_t_mul = 2.0  # see lr_t0
  c.child.grad_clip = 5.0  # benchmark ENAS.py: clip_grad_norm_(shared weights, 5), a global norm
  c.child.grad_clip_mode = "global"  # benchmark: one norm over all shared weights
  c.child.nesterov = True  # benchmark: Nesterov 0.9 (search and final)
  # The controller: the benchmark's ENAS controller (search_model_enas_utils.py:
  # an LSTM of 32 units and 2 layers, logits / 5 then 2.5 tanh, full categorical
  # entropy) and training (ENAS.sh / ENAS.config: Adam lr 1e-3, betas (0, 0.999),
  # eps 1e-3, 20 arcs per update, 50 updates per epoch, entropy weight 1e-4,
  # baseline decay 0.99): the ENAS macro script's training settings, the ENAS
  # paper's temperature and tanh constant.
  c.controller.lstm_size = 32  # benchmark 32 (ENAS scripts 64)
  c.controller.lstm_layers = 2  # benchmark 2 (ENAS scripts 1)
  c.controller.temperature = 5.0  # benchmark 5.0, ENAS paper 5.0 (ENAS scripts: none)
  c.controller.tanh_constant = 2.5  # benchmark 2.5, ENAS paper 2.5 (micro script 1.1)
  c.controller.op_tanh_reduce = 1.0  # benchmark: none (micro script 2.5)
  c.controller.entropy_mode = "full"  # benchmark: Categorical.entropy(), summed over the edges
  c.controller.entropy_weight = 1e-4  # benchmark 1e-4 (as the ENAS scripts)
  c.controller.lr = 1e-3  # benchmark 1e-3 (ENAS macro script 1e-3, micro 3.5e-3)
  c.controller.adam_b1 = 0.0  # benchmark betas (0, 0.999)
  c.controller.adam_eps = 1e-3  # benchmark 1e-3
  # Benchmark: PyTorch's Adam, eps added to the bias-corrected sqrt(v_hat): our
  # "optax" form (the ENAS scripts' TF1 form is "tf1").
  c.controller.adam_form = "optax"
  c.controller.num_aggregate = 20  # benchmark 20 (ENAS macro script 20, micro 10)
  c.controller.train_steps = 50  # benchmark 50 (ENAS macro script 50, micro 30)
  c.controller.skip_weight = 0.0  # no skip decisions in this space
  c.search.num_epochs = 310  # benchmark ENAS.config 310 (ENAS macro script 310)
  # Arcs sampled and scored after the search (benchmark: 100, each on one
  # validation batch; ours on derive.valid_batches batches).
  c.derive.num_samples = 100
  # Final training's epochs (benchmark 200), here so that search.then_final
  # trains as long as the final variant.
  c.final.num_epochs = 200
  return c


def _final(c):
  c.mode = "final"  # train one fixed arc from scratch
  c.arc = "resnet"  # the benchmark's ResNet cell ("3 0 3 1 0 1"); any arc: --config.arc="..."
  c.data.num_valid = 0  # benchmark "cifar10": all 50,000 training images, tested on the test set
  c.data.batch_size = 256  # benchmark 256
  c.child.lr_max = 0.1  # benchmark 0.1
  c.child.lr_min = 0.0  # benchmark eta_min 0
  c.child.lr_t0 = 200  # benchmark: one cosine over the 200 epochs, per epoch (as ours)
  c.child.l2_reg = 2.5e-4  # benchmark weight decay 5e-4 on every parameter (= l2_reg 2.5e-4)
  c.child.grad_clip_mode = "none"  # benchmark: no clipping in final training
  return c


def _smoke(c):
  c = config_base.cifar_smoke(c)
  c.space.cells_per_stage = 1  # 3 cells and the 2 residual blocks
  c.child.out_filters = 8  # smoke size
  c.controller.lstm_size = 16  # smoke size
  return c


def get_config(variant: str = "search"):
  variant = variant or "search"
  if variant not in VARIANTS:
    raise ValueError(f"configs/cifar_nb201.py: unknown variant {variant!r}; choose one of "
                     f"{VARIANTS}.")
  c = _nb201_fields(config_base.cifar("cifar_nb201"))
  c.variant = variant
  if variant == "search":  # the derived cell keeps num_nodes; the network is the same
    c.search.final_recipe = config_base.final_recipe(
        c, _final(_nb201_fields(config_base.cifar("cifar_nb201"))),
        exclude=("space.num_nodes",))
  if variant == "final":
    c = _final(c)
  elif variant == "smoke":
    c = _smoke(c)
  c.lock()
  return c
