"""Client-side local training: one client's update as a pure function, run over a clients axis.

The U-shaped split step is three functions joined by `jax.vjp`: the client head's activations go up to
the server, the server body's activations come down, the client tail computes the loss, and the
activation gradients travel back the same way. Those four arrays are what crosses the cut; their bytes
are counted from the arrays themselves.

Batch layout seen by one client's local round (the clients axis C is added by vmap):
  input_ids, attention_mask: [S, A, B, T]   (S steps, A accumulation micro-batches)
  target_index, target_mask: [S, A, B, R]   (positions whose next token is a target; see
                                             `fellrec_jax.data.pipeline`)
  example_mask:              [S, A, B]
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import models
from federated.cut_defense import CutDefense, sequence_dcor, through_cut, visible_positions
from federated.losses import generative_loss, model_outputs
from models.config import ModelConfig

PyTree = Any
Batch = dict[str, jax.Array]


ITEM_SIDES = ("frozen", "table", "encoder")


@dataclasses.dataclass(frozen=True)
class LocalSpec:
  """Static description of a client's local step.

  split_k: None trains the unsplit model; an int runs the real U-shaped split at block k.
  server_lora: "per_client" (server blocks carry this client's adapters) or "frozen" (no server adapters).
  hidden: the loss sees final hidden states `[B, T, D]` instead of logits (discriminative training).
  item_side: where the discriminative item vectors `[I, D]` that users are scored against come from (None
    for generative training):
    "frozen": base-model title embeddings, `base["items"]["table_id"]`;
    "table": a trainable table `trainable["items"]["table_id"]`, or a trainable low-rank correction
      `trainable["items"]["u_ir"] @ ["v_rd"]` of the frozen one, trained and aggregated like the adapters;
    "encoder": the titles `base["items"]["title_ids"/"title_mask"]` re-encoded under the client's adapters
      once per local round (RecFormer), without gradient; with a split, their activations cross the cut
      (counted by `item_encoding_traffic`; the simulation runs the whole encoder in one place).
  item_tokens: inputs are item ids, one position each, embedded with the frozen base-model title embeddings
    `base["items"]["input_id"]` (item-as-token). Frozen inputs make a client head without adapters a
    constant function of the data, so its activations can be computed once (`batch["head_act"]`). A
    trainable item-ID embedding `trainable["items"]["embed_id"]` (`tail_input`), if the client has one,
    is added where the client tail starts: the last block sees which items these are, not only what
    their titles say, and the head stays constant.
  defense: what the client does at the cut (noise, NoPeek, private response; `federated.cut_defense`).
  """

  config: ModelConfig
  split_k: int | None = None
  server_lora: str = "per_client"
  hidden: bool = False
  item_side: str | None = None
  item_tokens: bool = False
  defense: CutDefense = CutDefense()

  def __post_init__(self):
    if self.server_lora not in ("per_client", "frozen"):
      raise ValueError(f"server_lora must be 'per_client' or 'frozen', got {self.server_lora!r}")
    if self.item_side not in (None, *ITEM_SIDES):
      raise ValueError(f"item_side must be one of {ITEM_SIDES} or None, got {self.item_side!r}")


def item_vectors(base: PyTree, trainable: PyTree) -> jax.Array | None:
  """`[I, D]` the vectors items are scored by: the client's trainable table if it has one (a full table
  `table_id`, or a low-rank correction `u_ir @ v_rd` of the frozen `base["items"]["table_id"]`), else
  `base["items"]["table_id"]` (frozen, or this round's re-encoded titles from `with_round_items`); None for
  generative training."""
  frozen = base.get("items", {}).get("table_id")
  items = trainable.get("items", {})
  if "table_id" in items:
    return items["table_id"]
  if "u_ir" in items:
    return frozen + items["u_ir"] @ items["v_rd"]
  return frozen


def scored_vectors(spec: LocalSpec, params: PyTree, frozen: PyTree, trainable: PyTree) -> jax.Array:
  """`[N, D]` what the loss scores the final hidden states against: the items (`item_vectors`, discriminative
  training) or the output token vectors of `params`' head (`models.token_vectors`, generative training)."""
  return item_vectors(frozen, trainable) if spec.hidden else models.token_vectors(spec.config, params)


def tail_input(trainable: PyTree, input_ids_bt: jax.Array) -> jax.Array | None:
  """`[B, T, D]` the client's trainable item-ID embeddings of an item-as-token batch, added to the residual
  stream where the client tail starts (`models.apply`'s `tail_input_btd`); None without them."""
  table = trainable.get("items", {}).get("embed_id")
  return None if table is None else jnp.take(table, input_ids_bt, axis=0)


def with_round_items(spec: LocalSpec, base: PyTree, trainable: PyTree, batch_size: int = 256) -> PyTree:
  """`base` with this round's item vectors for `item_side="encoder"`: every title encoded (bidirectionally,
  mean-pooled) under the client's current adapters, as RecFormer re-encodes its items each epoch. The
  vectors are constants of the round: no gradient flows into them. Other item sides: `base` unchanged."""
  if spec.item_side != "encoder":
    return base
  text_config = dataclasses.replace(spec.config, causal=False)
  titles = base["items"]

  def encode(row):  # one title `[Tt]` (lax.map batches `batch_size` of them)
    ids, mask = row
    return models.sequence_representation(text_config, base, ids[None], mask[None], lora=trainable)[0]

  vectors_id = jax.lax.map(encode, (titles["title_ids"], titles["title_mask"]), batch_size=batch_size)
  return dict(base, items=dict(titles, table_id=jax.lax.stop_gradient(vectors_id)))


def item_encoding_traffic(spec: LocalSpec, base: PyTree) -> int:
  """Bytes that cross the cut each way when a split client re-encodes its titles (`item_side="encoder"`):
  every title token's activations go up to the server's blocks and come back once (no gradient)."""
  if spec.item_side != "encoder" or spec.split_k is None:
    return 0
  title_ids = base["items"]["title_ids"]
  return title_ids.size * spec.config.hidden_size * jnp.dtype(spec.config.dtype).itemsize


def model_params(spec: LocalSpec, params: PyTree, base: PyTree) -> PyTree:
  """`params` (the whole model or a segment) as the model runs them: for item-as-token inputs the token
  table is the frozen item input vectors `base["items"]["input_id"]`."""
  return models.item_token_params(params, base["items"]["input_id"]) if spec.item_tokens else params


def _concat_layers(*trees):
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)


def split_segments(spec: LocalSpec, segments: tuple[PyTree, PyTree, PyTree], batch: Batch, *,
                   base_items: PyTree | None = None, rngs=(None, None, None), loss_fn=generative_loss):
  """The U-shaped split's three segments as functions of what trains and what crosses the cut:

    head(lora_head) -> act_up `[B, T, D]`                     (client: embeddings, blocks [0, k))
    body(lora_body, act_up) -> act_down `[B, T, D]`           (server; its adapters unused if frozen)
    tail(lora_tail, act_down, items) -> (loss_sum, count)     (client: the rest, and the loss)

  `segments` are `models.split`'s `(head, body, tail)` base parameters (a segment not used may be None);
  `base_items` the frozen item data (`base["items"]`), `items` a trainable item table or None. The training
  step (`split_value_and_grad`) and the cost analysis (`federated.resources.segment_fns`) both join these.
  """
  cfg = spec.config
  head, body, tail = segments
  frozen = {} if base_items is None else {"items": base_items}
  mask = batch["attention_mask"]
  per_client = spec.server_lora == "per_client"  # else the server's blocks run without adapters

  def head_fn(lora_head):
    return models.client_head(cfg, model_params(spec, head, frozen), batch["input_ids"], mask, lora=lora_head,
                              rng=rngs[0])

  def body_fn(lora_body, act_up, server_mask=None):  # server_mask: the positions it gets (private response)
    return models.server_body(cfg, body, act_up, mask if server_mask is None else server_mask,
                              lora=lora_body if per_client else None,
                              rng=rngs[1] if per_client else None)

  def tail_fn(lora_tail, act_down, items):
    trainable = {} if items is None else {"items": items}
    out = models.client_tail(cfg, tail, act_down, mask, lora=lora_tail, rng=rngs[2],
                             tail_input_btd=tail_input(trainable, batch["input_ids"]),
                             **model_outputs(spec.hidden, batch))
    return loss_fn(out, batch, scored_vectors(spec, tail, frozen, trainable))

  return head_fn, body_fn, tail_fn


def cut_traffic(act_up, act_down, grad_down, grad_up=None) -> dict[str, int]:
  """Bytes across the cut, from the arrays (or their shapes): up = act_up + grad(act_down), down = act_down +
  grad(act_up) (none when the client head does not train)."""
  nbytes = lambda x: 0 if x is None else math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
  return {"up": nbytes(act_up) + nbytes(grad_down), "down": nbytes(act_down) + nbytes(grad_up)}


def split_value_and_grad(spec: LocalSpec, base: PyTree, lora: PyTree, batch: Batch, rng, loss_fn=generative_loss):
  """Loss sum, token count, trainable grads and cut traffic of one micro-batch through the real split.

  A trainable item table and item-ID embeddings (`lora["items"]`) act on the client tail: their gradients
  never cross the cut. `spec.defense` changes what the server receives (`federated.cut_defense.through_cut`).
  Returns `(loss_sum, count, grads, traffic)` with `traffic = {"up": bytes client->server, "down": bytes
  server->client}`.
  """
  cfg, k, defense = spec.config, spec.split_k, spec.defense
  lora_head, lora_body, lora_tail = models.split(cfg, lora, k)
  items = lora.get("items")  # a trainable item table scores on the client tail only
  rngs = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
  segments = models.split(cfg, base, k)
  head_fn, body_fn, tail_fn = split_segments(spec, segments, batch, base_items=base.get("items"), rngs=rngs,
                                             loss_fn=loss_fn)
  # A client head without adapters (`--cache_head`): its activations were computed once, and nothing
  # below the cut trains, so the server sends no activation gradient down.
  cached_head = "head_act" in batch
  if cached_head:
    act_up = batch["head_act"]
  else:
    act_up, head_vjp = jax.vjp(head_fn, lora_head)
  mask = batch["attention_mask"]
  visible = visible_positions(mask, batch["target_index"], batch["target_mask"]) if defense.private_response else None
  act_down, body_vjp, sent, server_out = through_cut(
      defense, body_fn, lambda a: models.client_body_copy(cfg, segments[1], a, mask), lora_body, act_up, visible, rng)
  loss_sum, tail_vjp, count = jax.vjp(tail_fn, lora_tail, act_down, items, has_aux=True)

  grad_tail, grad_down, items_tail = tail_vjp(jnp.ones_like(loss_sum))
  grad_body, grad_up, grad_server = body_vjp(grad_down)
  if cached_head:
    grad_head, grad_up = jax.tree.map(jnp.zeros_like, lora_head), None
  else:
    grad_act = grad_up
    if defense.nopeek > 0:  # w * dCor per target token: `make_local_update` divides the grads by the count
      emb = models.embed(cfg, model_params(spec, segments[0], base), batch["input_ids"])
      grad_act = grad_act + jax.vjp(lambda a: sequence_dcor(emb, a, mask), act_up)[1](defense.nopeek * count)[0]
    grad_head = head_vjp(grad_act)[0]
  grads = _concat_layers(grad_head, grad_body, grad_tail)
  if items is not None:
    grads["items"] = items_tail
  return loss_sum, count, grads, cut_traffic(sent, server_out, grad_server, grad_up)


def forward_loss(spec: LocalSpec, base: PyTree, trainable: PyTree, batch: Batch, rng=None, loss_fn=generative_loss):
  """`(loss_sum, count)` of one micro-batch through the whole model in one place."""
  params = model_params(spec, base, base)
  out = models.apply(spec.config, params, batch["input_ids"], batch["attention_mask"], lora=trainable, rng=rng,
                     tail_input_btd=tail_input(trainable, batch["input_ids"]), **model_outputs(spec.hidden, batch))
  return loss_fn(out, batch, scored_vectors(spec, params, base, trainable))


def unsplit_value_and_grad(spec: LocalSpec, base: PyTree, lora: PyTree, batch: Batch, rng, loss_fn=generative_loss):
  """Same contract as `split_value_and_grad` for the whole model in one place (no traffic)."""
  (loss_sum, count), grads = jax.value_and_grad(
      lambda lp: forward_loss(spec, base, lp, batch, rng, loss_fn), has_aux=True)(lora)
  return loss_sum, count, grads, {"up": 0, "down": 0}


def make_local_update(spec: LocalSpec, tx: optax.GradientTransformation,
                      penalty: Callable[[PyTree, PyTree], jax.Array] | None = None, loss_fn=generative_loss):
  """One client's local round: `(base, lora, opt_state, batches, rng) -> (lora, opt_state, stats)`.

  Steps whose micro-batches hold no target token (a client that ran out of data) leave the state
  untouched, and so do non-finite steps (a loss, gradient or updated adapter that is NaN or inf): the
  adapters and optimizer state stay at the last finite step, and the step counts in `nonfinite_steps`.
  `stats`: loss (token-weighted mean over the finite steps), tokens, examples, bytes_up, bytes_down, steps,
  nonfinite_steps.
  """
  value_and_grad = unsplit_value_and_grad if spec.split_k is None else split_value_and_grad

  def local_update(base, lora, opt_state, batches, rng):
    base = with_round_items(spec, base, lora)
    anchor = lora  # the round's starting adapters, for `penalty`

    def step(lora, opt_state, step_batches, key):
      def micro(acc, mb):
        batch, mkey = mb
        loss_sum, count, grads, traffic = value_and_grad(spec, base, lora, batch, mkey, loss_fn)
        active = jnp.any(batch["example_mask"] > 0)
        return (acc[0] + loss_sum, acc[1] + count, jax.tree.map(jnp.add, acc[2], grads),
                acc[3] + active * traffic["up"], acc[4] + active * traffic["down"]), None

      zero = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, lora), jnp.zeros(()), jnp.zeros(()))
      keys = jax.random.split(key, jax.tree.leaves(step_batches)[0].shape[0])
      (loss_sum, count, grads, up, down), _ = jax.lax.scan(micro, zero, (step_batches, keys))
      grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
      if penalty is not None:
        grads = jax.tree.map(jnp.add, grads, jax.grad(penalty)(lora, anchor))
      updates, new_opt = tx.update(grads, opt_state, lora)
      new_lora = optax.apply_updates(lora, updates)
      finite = jnp.isfinite(loss_sum) & all_finite(grads) & all_finite(new_lora)
      active = (count > 0) & finite
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)
      stats = {"loss_sum": jnp.where(active, loss_sum, 0.0), "tokens": jnp.where(active, count, 0.0),
               "bytes_up": up, "bytes_down": down, "steps": active.astype(jnp.float32),
               "nonfinite_steps": (~finite).astype(jnp.float32), "examples": jnp.sum(step_batches["example_mask"])}
      return keep(new_lora, lora), keep(new_opt, opt_state), stats

    # A client past the end of its data gets all-padding steps at the end (lockstep epochs): the loop stops
    # after its last step with an example. Under vmap the trip count is the largest among the clients run
    # together, the finished clients' results discarded (a `lax.cond` would instead broadcast every operand,
    # the shared base included, to the clients axis); grouping clients of similar sizes is what saves work.
    num_steps = jax.tree.leaves(batches)[0].shape[0]
    last = last_step_with_examples(batches["example_mask"])
    keys = jax.random.split(rng, num_steps)
    names = ("loss_sum", "tokens", "bytes_up", "bytes_down", "steps", "nonfinite_steps", "examples")

    def body(carry):
      i, lora, opt_state, totals = carry
      lora, opt_state, stats = step(lora, opt_state, jax.tree.map(lambda x: x[i], batches), keys[i])
      return i + 1, lora, opt_state, {k: totals[k] + stats[k] for k in names}

    _, lora, opt_state, totals = jax.lax.while_loop(
        lambda carry: carry[0] < last, body, (jnp.zeros((), jnp.int32), lora, opt_state,
                                              {k: jnp.zeros(()) for k in names}))
    encoding = item_encoding_traffic(spec, base)
    stats = dict(totals, loss=totals["loss_sum"] / jnp.maximum(totals["tokens"], 1.0),
                 bytes_up=totals["bytes_up"] + encoding, bytes_down=totals["bytes_down"] + encoding)
    return lora, opt_state, stats

  return local_update


def order_by_steps(example_mask_nc: jax.Array) -> jax.Array:
  """`[shards, C, S, ...]` example masks -> `[shards, C]` each shard's clients by their number of steps up to
  the last one with an example, most first (ties in client order)."""
  last_nc = jax.vmap(jax.vmap(last_step_with_examples))(example_mask_nc)
  return jnp.argsort(-last_nc, axis=1, stable=True)


def last_step_with_examples(example_mask_s: jax.Array) -> jax.Array:
  """The number of leading steps up to the last one with an example (0 if none): `example_mask` `[S, ...]`."""
  num_steps = example_mask_s.shape[0]
  has_examples = jnp.any(example_mask_s.reshape(num_steps, -1) > 0, axis=1)
  return jnp.max(jnp.where(has_examples, jnp.arange(1, num_steps + 1), 0))


def all_finite(tree: PyTree) -> jax.Array:
  """Whether every element of every leaf is finite (a scalar bool)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def in_groups(local_update, group_size: int, shards: int = 1):
  """Runs `local_update(base, lora, opt_state, batches, key)` over the clients axis g at a time per shard,
  writing each group's new adapters and optimizer state back into the stacked state in place.

  A `fori_loop` over groups carries the whole state and updates a slice per iteration, so with donated
  inputs the new state reuses the input buffers; `lax.map` would stack its outputs into new buffers
  beside the inputs. Donate both the adapters and the optimizer state: with the adapters kept, XLA also
  copies the donated moments into the loop and back out (SmolLM2, r=8 q,v + AdamW: 9.9 MB per client
  instead of its 5.5 MB of state and data, in `launch.benchmark`'s scale section). With the clients axis
  split over `shards` devices, the state is viewed as `[shards, C / shards, ...]` and each iteration
  takes g clients from every shard, so the loop slices an unsplit axis and no device gathers another's
  clients. A last group of the remainder runs after the loop. A group of one client (g = 1, one shard)
  runs `local_update` itself, not its vmap, so the client's control flow stays unbatched (its
  all-padding steps are skipped, not computed and discarded).

  Groups are size-homogeneous: with more than one group, each shard's clients run in `order_by_steps`
  (most steps with examples first), so a group's step loop, which runs as long as its longest client,
  discards few steps of the others. Rows are gathered by that order and written back to the same rows.
  """
  vmapped = jax.vmap(local_update, in_axes=(None, 0, 0, 0, 0))

  def one(base, *per_client):  # [1, ...] slices -> the unbatched update -> [1, ...]
    out = local_update(base, *jax.tree.map(lambda x: x[0], per_client))
    return jax.tree.map(lambda x: x[None], out)

  def run(base, lora, opt_state, batches, keys):
    num_clients = jax.tree.leaves(lora)[0].shape[0]
    n_shards = shards if num_clients % shards == 0 else 1  # `sharding.over_clients` replicates then
    per_shard = num_clients // n_shards
    size = min(group_size, per_shard)
    full, rest = divmod(per_shard, size)
    to_shards = lambda tree: jax.tree.map(lambda x: x.reshape(n_shards, per_shard, *x.shape[1:]), tree)
    to_clients = lambda tree: jax.tree.map(lambda x: x.reshape(num_clients, *x.shape[2:]), tree)

    lora, opt_state, batches, keys = to_shards((lora, opt_state, batches, keys))
    order = order_by_steps(batches["example_mask"]) if full + bool(rest) > 1 else None

    # Size-ordered groups are read and written one client row at a time by dynamic slices with a static
    # shard index: a gather or scatter of the whole state (also a vmapped slice with a batched index) made
    # XLA copy every bf16 moment on CPU (1.8 MB more per SmolLM2 client).
    def row(x, s, i):
      return jax.lax.dynamic_index_in_dim(x[s], i, 0, keepdims=False)

    def put_row(x, s, i, value):
      return jax.lax.dynamic_update_slice(x, value[None, None], (s, i) + (0,) * (x.ndim - 2))

    def rows(tree, start, size):  # [shards, per_shard, ...] -> the group's [shards * size, ...]
      if order is None:
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
      else:
        take = lambda x: jnp.stack([jnp.stack([row(x, s, order[s, start + j]) for j in range(size)])
                                    for s in range(n_shards)])
      return jax.tree.map(lambda x: take(x).reshape(n_shards * size, *x.shape[2:]), tree)

    def write(tree, part, start):
      part = jax.tree.map(lambda p: p.reshape(n_shards, -1, *p.shape[1:]), part)
      if order is None:
        return jax.tree.map(lambda x, p: jax.lax.dynamic_update_slice_in_dim(x, p, start, 1), tree, part)
      for s, j in itertools.product(range(n_shards), range(jax.tree.leaves(part)[0].shape[1])):
        tree = jax.tree.map(lambda x, p: put_row(x, s, order[s, start + j], p[s, j]), tree, part)
      return tree

    group_stats = jax.eval_shape(vmapped, base, *rows((lora, opt_state, batches, keys), 0, 1))[2]
    stats = jax.tree.map(lambda s: jnp.zeros((n_shards, per_shard, *s.shape[1:]), s.dtype), group_stats)

    def group(start, size, carry):
      lora, opt_state, stats = carry
      new = (one if size * n_shards == 1 else vmapped)(base, *rows((lora, opt_state, batches, keys), start, size))
      return write(lora, new[0], start), write(opt_state, new[1], start), write(stats, new[2], start)

    carry = jax.lax.fori_loop(0, full, lambda i, c: group(i * size, size, c), (lora, opt_state, stats))
    return to_clients(group(full * size, rest, carry) if rest else carry)
  return run


def over_clients(local_update, execution: str = "vmap", group_size: int | None = None, shards: int = 1):
  """Lifts a one-client update to stacked clients; the base weights are shared, not vmapped.

  execution: "vmap" (all clients in one program; `group_size` runs them g at a time per device shard
  of the clients axis, `in_groups`, to bound memory) or "sequential" (a Python loop, one jitted call
  per client). `shards`: devices on the mesh's clients axis.
  """
  if execution == "vmap":
    if group_size and group_size > 0:
      return in_groups(local_update, group_size, shards)
    return jax.vmap(local_update, in_axes=(None, 0, 0, 0, 0))
  if execution == "sequential":
    one = jax.jit(local_update)

    def sequential(base, *per_client):
      num_clients = jax.tree.leaves(per_client)[0].shape[0]
      outs = [one(base, *jax.tree.map(lambda x: x[c], per_client)) for c in range(num_clients)]
      return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return sequential
  raise ValueError(f"unknown client execution {execution!r}; expected 'vmap' or 'sequential'")
