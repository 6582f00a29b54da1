"""kimi_jax: the Kimi k1.5 RL system in JAX.

Tensor names carry their shape as a suffix of axis letters joined by "x": `logits_BxTxV` is
[batch rows, positions, vocabulary]. Each letter means one thing everywhere:

  A  width of one attention head (head_dim)
  B  batch rows: sequences of a device batch, or trajectories of an RL iteration
  C  colour channels of an image
  D  model width (hidden_size)
  E  flattened pixel values of one image patch (channels x frames x patch pixels)
  F  MLP hidden width (intermediate_size, or the patch merger's)
  G  prompt groups (the k samples of one prompt)
  H  attention heads (query heads; rotary embeddings take any heads)
  I  decode steps of one engine chunk
  J  stop token ids of one request
  K  key/value heads
  L  layers
  M  image tokens after the vision tower's patch merger
  N  samples per prompt (k1.5's k)
  O  image patches (vision-tower tokens)
  P  prompts
  Q  query heads per key/value head (H = K * Q)
  R  request rows: one per sample, prompt-major (P * N)
  S  key positions: KV-cache slots or token history
  T  positions of a sequence (query positions in attention)
  U  distinct prompts among a batch's rows
  V  vocabulary
  W  window of tokens (repetition detection)
  X  image width in pixels or patches
  Y  image height in pixels or patches
  Z  image frames (time)
"""
