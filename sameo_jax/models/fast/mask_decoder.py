"""The mask decoder of models/mask_decoder.py, rewritten for speed.

Same parameters, same function (tests/test_decoder_fast_paths.py holds it to the reference),
with these exact rewrites:
- identical padding tokens run once, weighted by their count (two_way_transformer.py);
- only the wanted outputs are computed (`mask_ids`, `prompt_tokens=False`): the other tokens
  skip the final attention, the other mask tokens the hypernetworks and the mask product;
- `decoder_prompt_chunk` prompts of an image run at a time (a loop), so per-prompt feature
  maps stay in cache; with `decoder_remat` each loop step is recomputed in the backward pass
  instead of keeping its maps;
- the first transposed convolution may read the image tokens in factored form (low_rank.py)
  when an image has enough prompts for that to be less work (`factored_upscale`);
- the transposed convolutions stay in sub-pixel layout [..., h, w, 2, 2, F] and only the
  final masks are pixel-shuffled; their products take the kernel gradient as one product
  contracting the rows (`rows_times_kernel`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sameo_jax.models.config import EfficientSamConfig
from sameo_jax.models.fast.low_rank import LowRankTokens
from sameo_jax.models.fast.two_way_transformer import TwoWayTransformer
from sameo_jax.models.layers import Mlp, gelu
from sameo_jax.models.mask_decoder import GROUP_NORM_EPS


@jax.custom_vjp
def rows_times_kernel(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [N, C] @ kernel [C, F] -> [N, F] for many rows N; the kernel gradient is x^T dy as one
    product contracting the rows of both (XLA's CPU backend otherwise transposes dy first)."""
    return x @ kernel


def _rows_times_kernel_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def _rows_times_kernel_bwd(residuals, dy):
    x, kernel = residuals
    dkernel = jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())))
    return dy @ kernel.T, dkernel.astype(kernel.dtype)


rows_times_kernel.defvjp(_rows_times_kernel_fwd, _rows_times_kernel_bwd)


class Upsample2x(nn.Module):
    """`ConvTranspose2x2` (models/mask_decoder.py) in sub-pixel layout: [..., C] ->
    [..., 2, 2, F], out[..., a, b, :] being output pixel (2i + a, 2j + b) of input pixel
    (i, j). Also reads `LowRankTokens` of [..., S, C] (-> [..., S, 2, 2, F])."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array | LowRankTokens) -> jax.Array:
        c = x.base.shape[-1] if isinstance(x, LowRankTokens) else x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        f, dt = self.features, self.dtype
        w = kernel.astype(dt).transpose(2, 0, 1, 3).reshape(c, 4 * f)
        if isinstance(x, LowRankTokens):  # the bias goes into the pieces' small offset
            y = x.linear(w, jnp.tile(bias.astype(dt), 4)).dense()
        else:
            # Bias added over one merged sub-pixel axis: its gradient is a plain column sum.
            rows = rows_times_kernel(x.astype(dt).reshape(-1, c), w)
            y = (rows.reshape(-1, f) + bias.astype(dt)).reshape(*x.shape[:-1], 4 * f)
        return y.reshape(*y.shape[:-1], 2, 2, f)


def shuffle_subpixels(x: jax.Array) -> jax.Array:
    """[..., h, w, a1, b1, a2, b2] (two nested 2x upsamplings) -> [..., 4h, 4w], row
    4i + 2 a1 + a2 and column 4j + 2 b1 + b2."""
    *lead, h, w = x.shape[:-4]
    x = jnp.moveaxis(x, (-4, -2), (-5, -4))  # [..., h, a1, a2, w, b1, b2]
    return x.reshape(*lead, 4 * h, 4 * w)


def _repeat_last(x: jax.Array, copies: int) -> jax.Array:
    """[..., N, D] -> [..., N - 1 + copies, D], the last row repeated."""
    last = jnp.broadcast_to(x[..., -1:, :], (*x.shape[:-2], copies, x.shape[-1]))
    return jnp.concatenate([x[..., :-1, :], last], axis=-2)


class MaskDecoder(nn.Module):
    """The reference `MaskDecoder`'s outputs, computing only what is asked for.

    sparse [B, Q, P, D], embeddings [B, E, E, D], dense_pe [E, E, D]; padding: how many of the
    last prompt tokens are identical padding tokens; mask_ids: the mask tokens to return
    (K = len(mask_ids), all M by default); prompt_tokens=False returns only the tokens the
    outputs come from (the IoU token and the wanted mask tokens).
    Returns (logits [B, Q, K, 4E, 4E], iou [B, Q, K], hyper_in [B, Q, K, D/8], tokens).
    """

    config: EfficientSamConfig

    def __call__(self, sparse: jax.Array, embeddings: jax.Array, dense_pe: jax.Array,
                 padding: int = 0, prompt_tokens: bool = True,
                 mask_ids: tuple[int, ...] | None = None):
        num_masks = self.config.num_multimask_outputs + 1
        if mask_ids is None or self.is_initializing():  # init creates every mask token's head
            mask_ids = tuple(range(num_masks))
        log_weight = None
        if padding > 1:  # the padding tokens run as one, weighted by their count
            keep = sparse.shape[-2] - padding + 1
            sparse = sparse[..., :keep, :]
            log_weight = jnp.zeros(keep, jnp.float32).at[-1].set(np.log(padding))
        logits, iou, hyper_in, tokens = self._in_chunks(sparse, embeddings, dense_pe,
                                                        log_weight, prompt_tokens, mask_ids)
        if padding > 1 and prompt_tokens:
            tokens = _repeat_last(tokens, padding)
        return logits, iou, hyper_in, tokens

    def _in_chunks(self, sparse, embeddings, dense_pe, log_weight, prompt_tokens, mask_ids):
        """`_decode` on `config.decoder_prompt_chunk` prompts of one image at a time (a loop:
        different prompts never interact). With `config.decoder_remat` the loop runs also for
        unchunked prompts (all of an image per step) and each step is rematerialised, so the
        backward pass holds one step's per-prompt maps at a time."""
        b, q = sparse.shape[:2]
        chunk = self.config.decoder_prompt_chunk
        policy = self.config.remat_policy
        args = (dense_pe, log_weight, prompt_tokens, mask_ids)
        chunked = bool(chunk) and q > chunk and q % chunk == 0
        if self.is_initializing() or not (chunked or policy):
            return self._decode(sparse, embeddings, *args)
        chunk = chunk if chunked else q
        n = q // chunk
        embeddings = jnp.asarray(embeddings)  # indexed by the loop's traced image number
        decoder = MaskDecoder(self.config, parent=None)  # applied inside the loop

        def run(variables, image, sparse_chunk):
            return decoder.apply(variables, sparse_chunk, embeddings[image][None], *args,
                                 method=MaskDecoder._decode)

        if policy:
            run = jax.checkpoint(run, policy=policy, prevent_cse=False)  # in a loop: no CSE
        variables = self.variables
        images = jnp.repeat(jnp.arange(b), n)
        chunks = sparse.reshape(b * n, 1, chunk, *sparse.shape[2:])
        outs = jax.lax.map(lambda x: run(variables, *x), (images, chunks))
        return tuple(x.reshape(b, q, *x.shape[3:]) for x in outs)

    @nn.compact
    def _decode(self, sparse, embeddings, dense_pe, log_weight, prompt_tokens, mask_ids):
        cfg = self.config
        dt, d = cfg.compute_dtype, cfg.embed_dim
        num_masks = cfg.num_multimask_outputs + 1
        ids = tuple(mask_ids)
        b, q = sparse.shape[:2]
        e = embeddings.shape[1]
        normal = nn.initializers.normal(1.0)
        iou_token = self.param("iou_token", normal, (1, d))
        mask_tokens = self.param("mask_tokens", normal, (num_masks, d))
        out_tokens = jnp.concatenate([iou_token, mask_tokens], axis=0)
        tokens = jnp.concatenate(
            [jnp.broadcast_to(out_tokens, (b, q, 1 + num_masks, d)), sparse], axis=2
        ).astype(dt)
        keys = embeddings.reshape(b, 1, e * e, d).astype(dt)
        key_pe = dense_pe.reshape(e * e, d).astype(dt)
        token_log_weight = None
        if log_weight is not None:
            token_log_weight = jnp.concatenate([jnp.zeros(1 + num_masks, jnp.float32),
                                                log_weight])
        # Rank k factors cost d + q k products per image token against q d dense, for q prompts.
        k = cfg.decoder_depth * cfg.decoder_heads * tokens.shape[-2]
        use_factored = cfg.factored_upscale and q * (d - k) > d
        tokens, keys, factored = TwoWayTransformer(
            d, cfg.decoder_depth, cfg.decoder_heads, cfg.decoder_mlp_dim,
            cfg.attention_downsample_rate, dt, name="transformer",
        )(tokens, keys, key_pe, token_log_weight,
          outputs=None if prompt_tokens else (0, *(1 + i for i in ids)),
          factored_keys=use_factored)
        iou_out = tokens[..., 0, :]
        mask_out = tokens[..., 1:1 + len(ids), :] if not prompt_tokens else jnp.take(
            tokens, np.asarray([1 + i for i in ids]), axis=-2)

        x = factored if use_factored else keys.reshape(b, q, e * e, d)
        x = Upsample2x(d // 4, dt, name="upscale_conv1")(x)  # [B, Q, E*E, 2, 2, d/4]
        x = x.reshape(b, q, e, e, *x.shape[-3:])
        x = nn.GroupNorm(num_groups=1, epsilon=GROUP_NORM_EPS, use_fast_variance=False,
                         dtype=dt, reduction_axes=(-5, -4, -3, -2, -1), name="upscale_norm")(x)
        x = gelu(Upsample2x(d // 8, dt, name="upscale_conv2")(gelu(x)))  # [..., 2, 2, 2, 2, d/8]

        hyper_in = jnp.stack(
            [Mlp((d, d), d // 8, dt, name=f"hypernet_{i}")(mask_out[..., j, :])
             for j, i in enumerate(ids)], axis=-2)  # [B, Q, K, d/8]
        # Channels-last product, then one transpose of the (8x smaller) mask logits.
        masks = jnp.einsum("bqhwijklc,bqmc->bqhwijklm", x, hyper_in)
        masks = shuffle_subpixels(jnp.moveaxis(masks, -1, 2))  # [B, Q, K, 4E, 4E]
        iou = Mlp((cfg.iou_head_hidden, cfg.iou_head_hidden), num_masks, dt,
                  name="iou_head")(iou_out)[..., np.asarray(ids)]
        return masks.astype(jnp.float32), iou.astype(jnp.float32), hyper_in, tokens
