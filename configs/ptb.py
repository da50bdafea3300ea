"""ENAS on Penn Treebank: search a recurrent cell, derive it, train it from scratch.

Variants (``--config=configs/ptb.py:VARIANT``):

* ``search`` (default): shared-weight search with the LSTM controller, then
  derive (sample ``derive.num_samples`` arcs, score them, keep the best). The
  corrected code's hyperparameters with the seed's structure: see below.
* ``search_corrected``: the corrected code's search throughout (its controller
  structure, Adam, 10-node cell averaging all nodes, random-length windows).
* ``final``: train one fixed arc from scratch with the corrected code's GPU
  recipe (``--config.arc`` or ``--config.arc_file``; default: the corrected
  code's shipped 9-node cell, ``--config.arc=paper`` for the paper's) and
  report test perplexity.
* ``smoke``: the whole pipeline (search -> derive -> final) on a small
  synthetic corpus in a few minutes on 2 CPU cores; the README's quickstart.

Three sources disagree on many values: the paper, the seed repository's
scripts (``melodyguan/enas`` ``ptb_search.sh`` / ``ptb_final.sh``) and the
authors' corrected code (``google-research/enas_lm``), which their errata say
replaces the seed's PTB code. Each comment gives the sources' values and
which one we use. "paper" values are partly recalled.

``search`` takes the corrected code's hyperparameters (hidden 200, batch 128,
dropouts, TAR, w^4 decay, lr 20, clip 0.1, controller sizes, temperature, tanh
constant, entropy weight, baseline decay, controller lr, 25 updates per epoch,
node 0 fixed to tanh) but keeps the seed's structure: its controller (activation
logits from a separate ``w_soft``; node 0's anchor from an LSTM step, then a
one-choice node-0 activation step whose embedding feeds node 1's pointer), its
Adam (beta1 0, eps 1e-3), its 12-node cell averaging the loose ends, and fixed
35-token windows. ``search_corrected`` changes exactly these to the corrected
code's: activation logits tied to the op embedding, zero anchor and key for node
0 with node 1's pointer fed ``g_emb``, Adam beta1 0.9 and eps 1e-8, 10 nodes
averaging nodes 1..9, random window lengths with lr x len/35 (controller phase at
the end of each pass over the data, 600 x 207 steps in all). What remains
different from the corrected code there: reward windows are drawn at random (it
takes the next window of a cycling queue, and the first reward of a phase starts
from the training state), and derive is ours (it has no derive step).

Questions from the seed README's user notes, answered here:

* *What is M?* The number of arcs sampled per child step: always 1 (a fresh
  arc for every minibatch), as in both codebases.
* *What does ``nocontroller_training`` mean?* Skip the controller phase. With a
  fixed arc there is no controller at all: that is our ``final`` variant.
* *``fixed_arc``?* The architecture to train from scratch: ``config.arc``.
* *Does final training really take 16 hours on a CPU?* Far more: the
  corrected recipe is 3000 nominal epochs (1,242,000 steps of 64x35 tokens) at
  hidden size 800; see the README's timing table.
* *What is a logit?* The unnormalised score of each word (or each controller
  choice) before the softmax.
"""

import ml_collections

from enas_jax import config_base

VARIANTS = ("search", "search_corrected", "final", "smoke")


def _base() -> ml_collections.ConfigDict:
  # Run fields, the controller's shared fields, search/derive/final basics and
  # logging: enas_jax/config_base.py. This file sets PTB's values and adds its fields.
  c = config_base.common("ptb")

  # ------------------------------------------------------------------ data
  c.data = ml_collections.ConfigDict()
  c.data.source = "ptb"  # "ptb" (files in data_dir) or "synthetic" (generated corpus)
  # PTB text files ptb.{train,valid,test}.txt. Empty: $ENAS_JAX_DATA/ptb,
  # then ./data/ptb, the first that exists.
  c.data.data_dir = ""
  c.data.vocab_size = 10000  # PTB has exactly 10,000 word types
  # Search: 128 (corrected code); seed ptb_search.sh 20; paper 64. Final: 64.
  c.data.batch_size = 128
  # Batch of validation and reward windows: 128 x 35 in the corrected search
  # (16 windows cover the validation set), 64 x 35 in its final training.
  c.data.eval_batch_size = 128
  c.data.bptt = 35  # window length (all three sources: 35); with random_bptt the mean length
  # Variable-length BPTT (corrected code, search and final): each window's length is
  # drawn around bptt (35 w.p. 0.95, else 17.5; sd 5, truncated at 2 sd; range 7..44)
  # and the learning rate scaled by len/35. Seed and paper: fixed 35. On in the final
  # and search_corrected variants; search (the seed's structure) keeps fixed windows.
  c.data.random_bptt = False
  # Compiled window lengths for random_bptt: a window is padded to the smallest
  # bucket >= its length and masked (one compiled branch per bucket, one compilation).
  c.data.bptt_buckets = (20, 30, 35, 40, 45)
  # synthetic source only:
  c.data.num_train_tokens = 0  # synthetic: tokens in the train split
  c.data.num_valid_tokens = 0  # synthetic: tokens in the valid split
  c.data.num_test_tokens = 0  # synthetic: tokens in the test split
  c.data.seed = 0  # generator seed of the synthetic corpus

  # ----------------------------------------------------------------- space
  c.space = ml_collections.ConfigDict()
  c.space.name = "ptb"  # enas_jax.spaces.get(name)
  # Nodes in the cell including node 0. Seed 12 (arc of 23 tokens; the paper's
  # cell). The corrected code searches 9 nodes after node 0 (10 in all): search_corrected.
  c.space.num_nodes = 12
  # Activations the controller may sample: first k of (tanh, ReLU, identity,
  # sigmoid). The seed's controller had num_funcs=2 (only tanh/ReLU ever
  # sampled); corrected code 4. We use 4.
  c.space.num_activations = 4
  # Activations node 0 may take during search (first k). Corrected code: 1 (node 0
  # is always tanh, "an important change" in its source); seed: 2, stabilised by
  # search-time batch norm (child.batch_norm here, off by default). With 4 and no batch norm
  # the shared child diverged on PTB within 200 steps (ReLU/identity at node 0
  # let the recurrent state grow without bound). Any arc still parses and trains.
  c.space.node0_activations = 1
  # Cell output: "loose_ends" (seed; mean of nodes no later node reads) or
  # "all" (corrected code, search and GPU final: mean of nodes 1..N-1; search_corrected).
  # Not part of the arc string.
  c.space.aggregate = "loose_ends"

  # ----------------------------------------------------------------- child
  c.child = ml_collections.ConfigDict()
  # Hidden = embedding size. Corrected search 200; seed search 720, final 748;
  # paper 1000 (search). Corrected final 800.
  c.child.hidden_size = 200
  c.child.init_range = 0.04  # U(-r, r) for all weights. Corrected search 0.04, final 0.05
  # Dropout rates are drop probabilities (the seed's flags were keep probabilities).
  c.child.drop_e = 0.10  # embedding-row dropout. Corrected search 0.10, final 0.125; seed keep 0.75/0.79
  c.child.drop_i = 0.20  # locked dropout on embeddings. Corrected search 0.20, final 0.175; seed: none
  c.child.drop_x = 0.75  # mask on x into node 0. Corrected search 0.75, final 0.725; seed keep 0.25
  c.child.drop_l = 0.25  # mask on every node's input. Corrected 0.25 / 0.225; seed h_keep 0.75
  c.child.drop_o = 0.75  # locked dropout on the output. Corrected 0.75; seed keep 0.25 / 0.24
  c.child.alpha = 0.0  # activation regularisation alpha*mean(h^2). Corrected search 0, final 0.7
  # Temporal (slowness) regularisation beta*mean((h_t+1-h_t)^2). Corrected search 1.0,
  # final 0; seed final 1e-3 on sums (not means).
  c.child.beta = 1.0
  # Weight decay added to the loss. Corrected 8e-7; seed search 1e-7, final 5e-7.
  c.child.weight_decay = 8e-7
  # "w4_selected": the corrected search code's quirk, wd*sum(w^4)/2 over node 0's
  # and the selected node matrices except node 1 (faithful default for search);
  # "l2": wd*sum(w^2) over the arc's slices (search) or all weights (final);
  # "none". The seed applied wd*sum(w^2) to all 554M shared weights every step.
  c.child.weight_decay_mode = "w4_selected"
  c.child.lr = 20.0  # SGD. Corrected 20 (x len/35); seed search 0.25, final 20; paper 20
  c.child.grad_clip = 0.1  # global norm. Corrected search 0.1, final 0.25; seed search 10, final 0.25
  # Shared weights per (node, prev node, activation) as in both original codes
  # (554M at hidden 1000). True: per (node, prev node) only, as the PyTorch port
  # (146M at hidden 1000), for like-for-like comparisons.
  c.child.share_across_activations = False
  # How the traced arc picks an activation: "switch" (lax.switch), "mask"
  # (compute all four, select), or "auto" (switch; fastest measured on CPU).
  c.child.op_select = "auto"
  c.child.scan_unroll = 1  # lax.scan unroll factor of the time loop
  # Rematerialisation of the time step in the backward pass: "none" (keep all
  # activations), "dots" (keep only matmul outputs, recompute the elementwise
  # rest), "full" (keep only the recurrent state). Trades compute for memory.
  c.child.remat = "none"
  # Dtype of activations and matmul inputs: "float32", "bfloat16", or "auto"
  # (enas_jax.backend: bfloat16 on GPU/TPU, float32 on CPU, where the hidden-200
  # search step ran 2.3x slower in bfloat16; docs/performance.md). Parameters, optimizer state,
  # the carried recurrent state, softmax and losses stay float32. The original
  # codes ran float32 throughout.
  c.child.compute_dtype = "auto"
  # The seed's search-time batch norm on every node's pre-activation and on the
  # cell output (batch statistics, moving averages for evaluation and rewards).
  # Seed search: on; seed final: off; corrected code: off everywhere. We use off.
  c.child.batch_norm = False
  c.child.bn_decay = 0.999  # moving-average decay (seed 0.999)
  c.child.bn_eps = 1.0  # epsilon (seed 1.0)

  # ------------------------------------------------------------ controller
  c.controller.lstm_size = 64  # corrected 64; seed 100
  c.controller.init_range = 0.01  # U(-r, r). Corrected 0.01; seed 0.1
  c.controller.temperature = 5.0  # corrected 5; seed 5 (ptb_final.sh comments: 2)
  c.controller.tanh_constant = 2.25  # corrected 2.25; seed 2.5; paper 2.5
  c.controller.locality_prior = True  # subtract (i-j)^2/6 from pointer logits (both codes)
  c.controller.entropy_weight = 1e-5  # added to the reward. Corrected 1e-5; seed 1e-3; paper 1e-4
  c.controller.baseline_decay = 0.999  # EMA baseline. Corrected 0.999; seed 0.99
  c.controller.lr = 5e-5  # Adam. Corrected 5e-5; seed 1e-3; paper 3.5e-4
  # Adam as in the seed (beta1 = 0, eps = 1e-3). The corrected code used TF's
  # defaults (0.9, 1e-8): search_corrected.
  c.controller.adam_b1 = 0.0  # seed 0.0; corrected 0.9
  c.controller.adam_eps = 1e-3  # seed 1e-3; corrected 1e-8
  c.controller.num_aggregate = 10  # arcs whose REINFORCE gradients are averaged per update (both 10)
  c.controller.train_steps = 25  # updates per controller phase. Corrected 25; seed 100; paper 2000 arcs
  c.controller.reward_c = 80.0  # reward = c / valid_ppl (both codes)
  # Activation logits: False: h @ w_soft, a matrix of their own (seed); True:
  # h @ w_emb.T, tied to the activation embeddings, no w_soft (corrected; search_corrected).
  c.controller.tie_op_logits = False
  # Node 0's anchor and attention key: "lstm" (seed: the output of an LSTM step
  # on g_emb) or "zero" (corrected: zero vectors, no LSTM step; search_corrected).
  c.controller.node0_anchor = "lstm"
  # Input of node 1's pointer step: "act_emb" (seed: node 0's activation is a
  # controller step, one choice when node0_activations = 1, and node 1 reads its
  # embedding) or "g_emb" (corrected: node 0 is tanh and makes no controller step;
  # needs node0_activations = 1; search_corrected).
  c.controller.node1_input = "act_emb"

  # ---------------------------------------------------------------- search
  # Child epochs. Corrected 600 nominal epochs (124,200 steps of 128x35);
  # seed 100 (batch 20); paper 150.
  c.search.num_epochs = 600
  c.search.steps_per_dispatch = 50  # child steps per jitted call (host syncs only between calls)
  # Validation batches per epoch; a PTB batch is one eval_batch_size x bptt window,
  # each from a zero state (0 = all: 16 of 128x35 on PTB).
  c.search.valid_batches = 0
  # search.final_recipe here: the final variant's data.batch_size 64, random_bptt,
  # child.hidden_size 800, the final dropouts, weight_decay_mode l2, grad_clip
  # 0.25, ...; its space is the search's (the derived arc's). Override e.g.
  # --config.search.final_recipe.child.hidden_size=400.

  # ---------------------------------------------------------------- derive
  # Validation batches (eval_batch_size x bptt windows) per scored arc, the state
  # carried across them (0 = all).
  c.derive.valid_batches = 0

  # ----------------------------------------------------------------- final
  # Nominal epochs: the budget is num_epochs x (windows of length bptt per pass)
  # steps, as the corrected code counts (3000 -> 1,242,000 steps at batch 64, about
  # 2,870 real passes with random lengths). Corrected GPU 3000; seed 2000.
  c.final.num_epochs = 3000
  # Iterate averaging (corrected GPU recipe): a uniform running mean of the weights,
  # started when the epoch's validation perplexity is worse than the best of the
  # history excluding its last `average_nonmono` epochs; used for every
  # evaluation once started. The seed has none.
  c.final.average = True
  c.final.average_nonmono = 10  # corrected 10
  c.final.steps_per_dispatch = 50  # training steps per jitted call
  c.final.valid_batches = 0  # validation batches (bptt windows, state carried) per epoch; 0 = all
  c.final.test_batch_size = 1  # corrected: test at batch 1, bptt 1, state carried
  c.final.test_bptt = 1  # window length of the test pass (state carried across windows)
  return c


def _final(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fixed-arc training with the corrected code's GPU values where they exist."""
  c.mode = "final"
  # The corrected code's shipped arc "0 2 1 0 2 1 2 2 4 0 5 0 3 2 6 2" (its format), here
  # in seed format: 9 nodes, output = mean of nodes 1..8 (aggregate "all"). Its reference
  # test perplexity under this recipe: 57.3 +- 0.1 (GPU, 10 runs). The paper's cell is one
  # value away: --config.arc=paper (12 nodes, loose ends: our own experiment, no published
  # number under this recipe). Named arcs set space.num_nodes and space.aggregate.
  c.arc = "corrected"
  c.space.num_nodes = 9
  c.space.aggregate = "all"
  c.data.random_bptt = True
  c.data.batch_size = 64  # corrected final 64; seed final 64
  c.data.eval_batch_size = 64
  c.child.hidden_size = 800  # corrected 800; seed final 748
  c.child.init_range = 0.05
  c.child.drop_e = 0.125
  c.child.drop_i = 0.175
  c.child.drop_x = 0.725
  c.child.drop_l = 0.225
  c.child.drop_o = 0.75
  c.child.alpha = 0.7
  c.child.beta = 0.0
  c.child.weight_decay = 8e-7
  c.child.weight_decay_mode = "l2"  # wd*sum(w^2) over all trainables (corrected final)
  c.child.grad_clip = 0.25
  return c


def _smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Search -> derive -> final on a generated corpus, a few minutes on 2 cores.

  Keeps the 12-node cell; shrinks everything else.
  """
  c.data.source = "synthetic"
  c.data.vocab_size = 200
  c.data.num_train_tokens = 40_000
  c.data.num_valid_tokens = 8_000
  c.data.num_test_tokens = 4_000
  c.data.batch_size = 16
  c.data.eval_batch_size = 16
  c.data.bptt = 20
  c.child.hidden_size = 64
  c.child.init_range = 0.1
  # Light regularisation: a short run on a small corpus should show learning.
  c.child.drop_e = 0.0
  c.child.drop_i = 0.0
  c.child.drop_x = 0.1
  c.child.drop_l = 0.0
  c.child.drop_o = 0.1
  c.child.beta = 0.0
  c.child.lr = 20.0
  c.child.grad_clip = 0.25
  c.controller.lr = 1e-3  # faster controller learning for a short run
  c.controller.train_steps = 5
  c.search.num_epochs = 8
  c.search.steps_per_dispatch = 25
  c.search.then_final = True
  c.derive.num_samples = 10
  c.derive.valid_batches = 8
  c.final.num_epochs = 8
  c.final.valid_batches = 0
  c.final.test_batch_size = 1
  c.final.test_bptt = 1
  c.log_every = 25
  return c


def _search_corrected(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The corrected code's search structure on top of the shared values."""
  c.space.num_nodes = 10  # 9 nodes after node 0 (controller_num_layers = 9)
  c.space.aggregate = "all"  # mean of nodes 1..9
  c.data.random_bptt = True  # random lengths, lr x len/35
  c.controller.tie_op_logits = True
  c.controller.node0_anchor = "zero"
  c.controller.node1_input = "g_emb"
  c.controller.adam_b1 = 0.9
  c.controller.adam_eps = 1e-8
  return c


final_recipe = config_base.final_recipe  # the search.final_recipe builder


def get_config(variant: str = "search") -> ml_collections.ConfigDict:
  variant = variant or "search"
  if variant not in VARIANTS:
    raise ValueError(f"configs/ptb.py: unknown variant {variant!r}; choose one of {VARIANTS}.")
  c = _base()
  c.variant = variant
  if variant == "search":  # the derived arc keeps the search's space (num_nodes, aggregate)
    c.search.final_recipe = final_recipe(c, _final(_base()), exclude=("space",))
  elif variant == "search_corrected":
    c = _search_corrected(c)
    c.search.final_recipe = final_recipe(c, _final(_base()), exclude=("space", "controller"))
  if variant == "final":
    c = _final(c)
  elif variant == "smoke":
    c = _smoke(c)
  c.lock()
  return c
