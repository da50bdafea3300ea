"""The config schema's shared sections, declared once (light: ml_collections only).

Every file in ``configs/`` imports this module (``from enas_jax import config_base``)
and builds on it: :func:`common` declares the fields every space has (run,
controller, search, derive, final, logging); :func:`cifar` adds the fields the
CIFAR-10 spaces share and :func:`cifar_smoke` shrinks a CIFAR config. Each config
file then sets its space's values and adds its space's fields. A field's comment
here says what it means; a config that sets another value says its sources there.
"Scripts" = the original repository's ``scripts/cifar10_*.sh`` (``ptb_*.sh`` for
PTB); "paper" = Pham et al. (2018), where the paper gives a value.
"""

from __future__ import annotations

import ml_collections

from enas_jax import config_util

# search.final_recipe builder (see enas_jax.config_util.final_recipe).
final_recipe = config_util.final_recipe


def common(name: str) -> ml_collections.ConfigDict:
  """The fields every config has, with the ENAS CIFAR scripts' values; the
  configs set their own ``controller`` values and add the space's sections
  (``data``, ``space``, ``child``) and the search/derive/final fields of their own."""
  c = ml_collections.ConfigDict()
  c.name = name  # used for the default workdir runs/<name>_<variant>
  c.variant = "search"  # set by get_config(variant); names the default workdir
  c.seed = 0  # all randomness flows from jax.random.key(seed)
  # "search": search then derive; "final": train config.arc from scratch.
  c.mode = "search"
  # final: the arc to train, an arc string (README "Arc strings") or a named arc
  # of the space (e.g. "paper").
  c.arc = ""
  c.arc_file = ""  # final: a file holding the arc string (e.g. a search's best_arc.txt)
  c.eval_only = False  # final: evaluate the newest checkpoint (valid and test), no training

  c.controller = _controller()  # the controller fields of every space

  # ---------------------------------------------------------------- search
  c.search = ml_collections.ConfigDict()
  c.search.num_epochs = 310  # child epochs; set per config (scripts 310 macro, 150 micro)
  # "controller" (ENAS) or "uniform": the random-search baseline with the same
  # shared training and derive, arcs drawn uniformly.
  c.search.sampler = "controller"
  # First epoch after which the controller trains (all original scripts: 1).
  c.search.controller_start_epoch = 1
  c.search.steps_per_dispatch = 10  # child steps per jitted call (host syncs only between calls)
  c.search.then_final = False  # after derive, train the best arc from scratch in <workdir>/final
  # Validation batches per epoch (0 = all). A batch: eval_batch_size images
  # (CIFAR), or one eval_batch_size x bptt window (PTB). Set per space: cifar()
  # below, configs/ptb.py.
  c.search.valid_batches = 0
  # The final stage's recipe (then_final), filled by the search variant: the final
  # variant's values where they differ from the search's (each config lists its
  # own). The final stage takes these, the final section, and every other field
  # from this config, overrides included; the fields that shape the arc stay the
  # search's. Override e.g. --config.search.final_recipe.child.out_filters=48.
  # Empty in the smoke variants: their final stage keeps the small sizes.
  c.search.final_recipe = ml_collections.ConfigDict()

  # ---------------------------------------------------------------- derive
  c.derive = ml_collections.ConfigDict()
  # Arcs sampled from the trained controller and scored; the best goes to
  # best_arc.txt. No original code derives automatically (the paper: sample
  # several, keep the best on a validation minibatch); 100 as the PyTorch ports.
  c.derive.num_samples = 100
  c.derive.batch = 10  # arcs scored per jitted call
  c.derive.valid_batches = 0  # validation batches per scored arc (0 = all); set per space

  # ----------------------------------------------------------------- final
  c.final = ml_collections.ConfigDict()
  c.final.num_epochs = 310  # set per config (scripts 310 macro, 630 micro)
  c.final.steps_per_dispatch = 10  # training steps per jitted call
  c.final.valid_batches = 0  # validation batches per epoch (0 = all); set per space

  # --------------------------------------------------------------- logging
  # Child steps between metric lines, rounded to whole dispatches (all scripts: 50).
  c.log_every = 50
  c.checkpoint_every = 0  # child steps between mid-epoch checkpoints (0: epoch ends only)
  c.keep_checkpoints = 3  # newest checkpoints kept in <workdir>/checkpoints
  c.tensorboard = True  # also write TensorBoard event files to <workdir>/tensorboard
  c.distributed = "auto"  # jax.distributed.initialize(): "auto" (from the environment), True, False
  # Keep compiled steps in JAX's persistent compilation cache (a per-user folder,
  # see enas_jax/compile_cache.py) so a rerun skips compiling; False: off (as does
  # ENAS_JAX_COMPILATION_CACHE=0). Not in the original code (TensorFlow 1 graphs).
  c.compilation_cache = True
  c.debug = ml_collections.ConfigDict()
  # Fault injection: make the child loss NaN at this step (-1: off). Used by the
  # tests of the "stop on NaN, keep the last good checkpoint" behaviour.
  c.debug.inject_nan_at_step = -1
  return c


def _controller() -> ml_collections.ConfigDict:
  """The controller fields of every space (read once, by
  ``enas_jax.reinforce.ControllerSettings.from_config``)."""
  c = ml_collections.ConfigDict()
  c.lstm_size = 64  # hidden size of the controller LSTM (CIFAR scripts 64)
  c.lstm_layers = 1  # stacked LSTM layers (all original scripts: 1)
  c.init_range = 0.1  # every controller weight ~ U(-r, r) (CIFAR scripts: 0.1)
  c.temperature = 0.0  # logits / temperature; 0 = off (CIFAR scripts: none; paper 5.0)
  # tanh_constant * tanh(logits); set per config (scripts 1.5 macro, 1.1 micro; paper 2.5).
  c.tanh_constant = 1.5
  # Subtract (i-j)^2/6 from the logit of a pointer from node i to node j: the PTB
  # controllers' prior; the CIFAR controllers have none.
  c.locality_prior = False
  # "sampled": -p log p of the sampled tokens (PTB and macro originals); "full":
  # the true categorical entropy (micro original).
  c.entropy_mode = "sampled"
  # entropy_weight * entropy is added to the reward (CIFAR scripts 1e-4; paper 0.1).
  c.entropy_weight = 1e-4
  c.baseline_decay = 0.99  # EMA reward baseline decay (CIFAR scripts: 0.99)
  c.lr = 1e-3  # Adam; set per config (scripts 1e-3 macro, 3.5e-3 micro; paper 3.5e-4)
  c.adam_b1 = 0.0  # Adam beta1 (seed scripts: 0)
  c.adam_eps = 1e-3  # Adam epsilon (seed scripts: 1e-3)
  # Where eps enters Adam. "tf1": TF1's AdamOptimizer, which the original codes
  # (and so the paper's results) used: m / (sqrt(v) + eps) with the uncorrected v,
  # the bias correction folded into the lr. "optax": optax.adam, eps added to the
  # corrected sqrt(v_hat); with eps 1e-3 its early steps are up to ~30x larger.
  c.adam_form = "tf1"
  # Arcs whose REINFORCE gradients are averaged per update (scripts 20 macro, 10 micro).
  c.num_aggregate = 20
  c.train_steps = 50  # updates per controller phase (scripts 50 macro, 30 micro)
  # reward = reward_c * validation accuracy (CIFAR) or reward_c / perplexity (PTB).
  c.reward_c = 1.0
  return c


def cifar(space: str) -> ml_collections.ConfigDict:
  """:func:`common` plus the fields the CIFAR-10 spaces share, with the values
  the macro and micro scripts share (each CIFAR config sets its own sizes)."""
  c = common(space)

  # ------------------------------------------------------------------ data
  c.data = ml_collections.ConfigDict()
  c.data.source = "cifar10"  # "cifar10" (real data) or "synthetic" (generated images)
  # Directory holding cifar-10-batches-py/, TFDS cifar10 array_record data, or
  # cifar-10-python.tar.gz. Empty: $ENAS_JAX_DATA/cifar10, then ./data/cifar10.
  c.data.data_dir = ""
  # Which source to read: "auto" (python batches, then TFDS, then the archive),
  # "python", "tfds" or "archive".
  c.data.cifar10_source = "auto"
  # Download cifar-10-python.tar.gz (163 MiB) into data_dir when nothing is found
  # there: once, md5-checked, extracted to cifar-10-batches-py/. Each host downloads
  # into its own data_dir. Offline, one short try, then a message on how to get the
  # data by hand; set False on machines without internet.
  c.data.download = True
  # Where the download fetches the archive: the official URL, or a mirror serving
  # the same file (its md5 is checked).
  c.data.download_url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
  # Training images held out for validation and rewards: the LAST num_valid of the
  # 50,000 (scripts: 5,000 in search, 0 in final training).
  c.data.num_valid = 5000
  c.data.batch_size = 128  # child training batch (scripts: macro 128/100, micro 160/144)
  c.data.eval_batch_size = 100  # validation/test batch (scripts: 100)
  # Images per controller reward (a random validation minibatch); 0 = batch_size,
  # as the original.
  c.data.reward_batch_size = 0
  # Cutout square size in training augmentation (0 = off). No script sets it;
  # the paper's 2.89% micro result needs 16 (issue #39).
  c.data.cutout_size = 0
  # Cutout placement: "corner" (the original: top-left corner uniform, clipped
  # at the borders) or "centre" (DeVries & Taylor).
  c.data.cutout_anchor = "corner"
  c.data.num_train = 0  # synthetic source only: generated training images
  c.data.num_test = 0  # synthetic source only: generated test images
  c.data.seed = 0  # synthetic source only: generator seed

  # ----------------------------------------------------------------- space
  c.space = ml_collections.ConfigDict()
  c.space.name = space  # enas_jax.spaces.get(name)
  # Layers (macro) or normal layers (micro); set per config. A space without
  # such a size deletes it (del c.space.num_layers).
  c.space.num_layers = 12

  # ----------------------------------------------------------------- child
  c.child = ml_collections.ConfigDict()
  c.child.out_filters = 36  # channels C; set per config
  c.child.keep_prob = 0.9  # keep probability of the dropout before the classifier
  # l2_reg * sum(w^2) over every child weight (except micro's aux head, as in the
  # original), added to the loss.
  c.child.l2_reg = 2.5e-4
  # Cosine learning rate with warm restarts, per epoch (SGDR; scripts and paper).
  c.child.lr_max = 0.05  # scripts and paper: 0.05
  c.child.lr_min = 5e-4  # set per config (scripts 5e-4 search; paper 1e-3)
  c.child.lr_t0 = 10  # first cycle length in epochs (scripts and paper: 10)
  c.child.lr_t_mul = 2.0  # cycle growth factor (scripts and paper: 2)
  c.child.momentum = 0.9  # SGD momentum (all CIFAR scripts: 0.9)
  c.child.nesterov = True  # Nesterov momentum (all CIFAR scripts)
  # Gradient clipping bound. Scripts: 5.0 per tensor, which never clipped (the
  # original applied the unclipped gradient). We clip for real.
  c.child.grad_clip = 5.0
  # "global" (one norm over all gradients), "per_tensor" (the original's intent),
  # or "none". We use global.
  c.child.grad_clip_mode = "global"
  c.child.bn_decay = 0.9  # batch-norm moving-average decay (original 0.9)
  c.child.bn_eps = 1e-5  # batch-norm epsilon (original 1e-5; 1e-3 in macro's separable branch)
  # How the traced arc picks a layer's op: "switch" (lax.switch, each branch
  # rematerialised), "mask" (run every op, select one), or "auto" (switch). See
  # docs/performance.md for the measured costs.
  c.child.op_select = "auto"
  # Kernel set (enas_jax/kernels; not in the original): "cpu" (hand-written
  # gradients for convolutions, batch norm, pools and the switch; depthwise as
  # shifted slices: several times faster on XLA:CPU), "xla" (XLA's own ops,
  # autodiff and jax.checkpoint: the GPU/TPU baseline), or "auto" (cpu on CPU,
  # xla on GPU/TPU; enas_jax/backend.py decides).
  c.child.kernels = "auto"
  # Dtype of the child's activations and conv/matmul inputs: "float32",
  # "bfloat16", or "auto" (bfloat16 on GPU/TPU, float32 on CPU). Weights,
  # optimizer state, batch-norm statistics and moments, the loss and the
  # controller stay float32. The original used float32 throughout.
  c.child.compute_dtype = "auto"
  # Switch gradient by recomputation: the forward switch saves only the chosen
  # op's input and the backward pass recomputes that op in a second switch (micro:
  # one custom gradient per cell that saves only the cell's node buffer).
  # Without it, autodiff keeps the zero-filled residuals of every branch (about
  # 10x slower on CPU for macro, slower for micro too, and more memory).
  c.child.checkpoint_branches = True
  # Fixed child (final training) only: recompute each cell (micro: "cells") or
  # layer (macro: "layers") in the backward pass, keeping only its inputs.
  # Measured on CPU at the paper's final sizes: micro peak 11.9 -> 4.1 GiB for
  # 2% of the speed, macro 8.4 -> 3.2 GiB for 15% (docs/performance.md).
  # "none": keep every activation. Not in the original (new here).
  c.child.remat = "none"
  # Run consecutive cells/layers of identical shapes as one lax.scan over their
  # stacked weights (micro fixed: later normal cells of a stage; micro search:
  # cell cores of a stage; macro search: layers of a stage), so that XLA
  # compiles each once. "auto": the platform's default (enas_jax/backend.py:
  # False everywhere so far, measured in docs/performance.md: micro fixed
  # compile -40% but steps +20% on CPU; the search children compile and step
  # slower scanned), or True/False. Same function and parameters. New here.
  c.child.scan_layers = "auto"

  # ------------------------------------------------- controller (CIFAR only)
  # (tanh_constant / op_tanh_reduce) * tanh on op logits: micro 2.5; the
  # original's macro controller ignored the flag, so macro uses 1.0.
  c.controller.op_tanh_reduce = 1.0
  # Skip penalty KL(p_skip || skip_target), weight skip_weight, added to the
  # controller loss (macro scripts 0.4 / 0.8; the paper says "to the reward").
  # skip_weight 0 turns it off (micro has no skip decisions).
  c.controller.skip_target = 0.4
  c.controller.skip_weight = 0.8  # skip penalty weight (macro scripts 0.8; 0 = off)

  # ------------------------------------------- search, derive, final (CIFAR)
  c.search.valid_batches = 0  # validation batches per epoch (0 = all 50 of 100 images)
  # Validation batches (of eval_batch_size) per scored arc; 0 = all 5,000 images.
  # The paper scored one minibatch; 10 (1,000 images) ranks arcs less noisily.
  c.derive.valid_batches = 10
  c.final.valid_batches = 0  # validation batches per epoch when num_valid > 0 (0 = all)
  return c


def cifar_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a CIFAR config to generated images and a few minutes on 2 cores:
  search -> derive -> final."""
  c.data.source = "synthetic"
  c.data.num_train = 640
  c.data.num_valid = 128
  c.data.num_test = 128
  c.data.batch_size = 32
  c.data.eval_batch_size = 32
  c.child.out_filters = 8
  c.child.lr_t0 = 2
  c.controller.train_steps = 5
  c.controller.num_aggregate = 4
  c.controller.lr = 3e-3
  c.search.num_epochs = 3
  c.search.steps_per_dispatch = 8
  c.search.then_final = True
  c.derive.num_samples = 8
  c.derive.valid_batches = 2
  c.derive.batch = 4
  c.final.num_epochs = 2
  c.final.steps_per_dispatch = 8
  c.log_every = 8
  return c
