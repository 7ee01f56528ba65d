"""RS-KD in a plain Flax NNX + optax loop: a teacher store read through grain, the pure loss.

    python examples/optax_loop.py --tokens runs/tiny/tokens --teacher runs/tiny/teacher/rskd_n50 \
        [--steps 20] [--batch 8] [--alpha 0.0] [--chunk-size 32]

Uses only the public pieces another trainer would: `rskd_jax.store.grain_source.TeacherSource`
(token rows joined with teacher rows, token hashes checked), `rskd_jax.store.forms.ragged`
(flat entries: ~3x fewer host -> device bytes than the dense slots at N = 50) and the chunked
losses of `rskd_jax.losses`, which take the student's last hidden states and its output
projection, so no [B, L, V] logits are ever held. No rskd_jax.train, model or config.
Prints one line per step: the step, the loss, the KD and CE terms (means over positions).
"""

from __future__ import annotations

import argparse
import functools

import grain
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rskd_jax import losses
from rskd_jax.store import forms
from rskd_jax.store.grain_source import TeacherSource


class TinyLM(nnx.Module):
    """A small causal decoder: embedding, pre-norm attention + MLP blocks, tied output head."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.blocks = nnx.List([self._block(dim, heads, rngs) for _ in range(layers)])
        self.norm = nnx.RMSNorm(dim, rngs=rngs)

    @staticmethod
    def _block(dim, heads, rngs):
        return nnx.Dict(
            norm1=nnx.RMSNorm(dim, rngs=rngs),
            norm2=nnx.RMSNorm(dim, rngs=rngs),
            attn=nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs),
            up=nnx.Linear(dim, 4 * dim, rngs=rngs),
            down=nnx.Linear(4 * dim, dim, rngs=rngs),
        )

    def hidden(self, tokens_BxL: jax.Array) -> jax.Array:
        """Final hidden states [B, L, D]; logits would be hidden @ head_weight()."""
        x = self.embed(tokens_BxL)
        mask = nnx.make_causal_mask(tokens_BxL)
        for blk in self.blocks:
            x = x + blk["attn"](blk["norm1"](x), mask=mask)
            x = x + blk["down"](jax.nn.gelu(blk["up"](blk["norm2"](x))))
        return self.norm(x)

    def head_weight(self) -> jax.Array:
        return self.embed.embedding[...].T  # [D, V], tied to the input embedding


@functools.partial(nnx.jit, static_argnames=("alpha", "chunk_size"))
def train_step(model, optimizer, batch, *, alpha: float, chunk_size: int):
    tokens = batch["tokens"]

    def loss_fn(model):
        h_BxLxD, w_DxV = model.hidden(tokens), model.head_weight()
        # teacher position j predicts token j + 1: KD on every position, CE on all but the last
        kd = losses.sparse_kd_loss_from_hidden_ragged(
            h_BxLxD, w_DxV, batch["entry_pos"], batch["entry_ids"], batch["entry_weights"], chunk_size=chunk_size
        ).mean()
        ce = losses.cross_entropy_from_hidden(h_BxLxD[:, :-1], w_DxV, tokens[:, 1:], chunk_size=chunk_size).mean()
        return alpha * ce + (1 - alpha) * kd, (kd, ce)

    (loss, (kd, ce)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, kd, ce


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.0, help="CE weight (0: pure RS-KD)")
    p.add_argument("--chunk-size", type=int, default=32, help="positions per loss chunk")
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args()

    source = TeacherSource(args.tokens, args.teacher, args.split, fields=("ids", "weights", "num_ids"))
    # ragged entries, E padded to a multiple of 4096: a handful of shapes, so a few compiles
    ds = (
        grain.MapDataset.source(source)
        .shuffle(seed=0)
        .repeat()
        .batch(args.batch, drop_remainder=True)
        .map(lambda b: forms.ragged(b, bucket=4096))
    )
    model = TinyLM(source.teacher.vocab_size, dim=64, layers=2, heads=4, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(args.lr, weight_decay=0.01), wrt=nnx.Param)
    it = iter(ds.to_iter_dataset())
    for step in range(1, args.steps + 1):
        b = next(it)
        batch = {k: jnp.asarray(b[k]) for k in ("tokens", "entry_pos", "entry_ids", "entry_weights")}
        loss, kd, ce = train_step(model, optimizer, batch, alpha=args.alpha, chunk_size=args.chunk_size)
        print(f"step {step} loss {float(loss):.4f} kd {float(kd):.4f} ce {float(ce):.4f}", flush=True)


if __name__ == "__main__":
    main()
