"""Where is the learning signal? A first-order probe of one teacher/student pair, before any sweep.

    python -m tip.probe [pair=...] [data=...] [probe.prompts=8 probe.blocks=1 ...]

From the student's own rollouts on training prompts (a probed batch A and a disjoint held-out
batch B, ``probe.batches`` independent times), with gradients restricted to the last
``probe.blocks`` decoder blocks, the final norm and the output layer (so a real pair fits on a CPU),
it measures:

- per quadrant (median thresholds, as training labels them, and absolute ones:
  ``probe.absolute``): the tokens' share, mean h, delta, delta_fwd, the logit-space signal
  ||p_S - p_T||^2 (the squared gradient of the forward KL in the student's logits) and the
  curvature 1 - sum_v p_S(v)^2 (the trace of the softmax Jacobian, the Hessian of the loss in logit
  space up to its p_T-dependent part), and phi = <g_Q, g_ho> / |Q|: the mean alignment of a
  token's gradient with the all-token gradient of the held-out batch (the paper's phi-bar of Prop.
  1), also relative to the mean over all tokens;
- per rule and keep fraction (``probe.rules`` x ``probe.keeps``, the selection code training
  runs): the share of the all-token first-order descent it keeps, <g_S, g_ho> / <g_all, g_ho>, its
  cosine with the all-token gradient, and the share of Q3's own descent it keeps,
  <g_{S and Q3}, g_ho> / <g_Q3, g_ho>.

Here g_S is the gradient of the sum of the per-token losses (the run's divergence) over the token
set S: sums make the shares additive over a partition (the four quadrants' shares add up to 1).
Writes ``probe.json`` and ``probe.md`` (and ``probe.png``) into the run directory.

The package: ``tail`` (the trainable tail and the cut before it), ``measure`` (one batch's
measurements), ``predictions`` (the pre-registered predictions and their verdicts), ``tables``
(probe.md and probe.png), ``run`` (the command: rollouts, the batches, the files). Its settings are
the config group ``conf/probe/``.
"""
