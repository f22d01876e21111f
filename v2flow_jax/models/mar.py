"""MAR-style masked transformer encoder/decoder with a buffer prefix of n token rows (REFERENCE section 4).

Fixed shapes (see masking.py): the encoder gets the n buffer rows plus a static window of
`max_visible` patch rows, the padding rows of which are masked out as keys. The decoder scatters
the encoded visible rows back to their patch positions, fills every other position with the learned
mask token, runs over all n + L rows, drops the buffer and adds the "diffusion" position table:
one conditioning vector z per patch.
"""
from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from v2flow_jax.models.layers import TransformerBlock, dense, layer_norm, named

Dtype = Any
pos_init = nn.initializers.normal(0.02)

PRESETS = {
    # width, depth, heads (the same for encoder and decoder)
    "tiny": (64, 1, 2),
    "small": (256, 2, 4),
    "base": (768, 12, 12),
    "large": (1024, 16, 16),
    "huge": (1280, 20, 16),
}


def patch_to_token(num_patches: int, num_tokens: int) -> np.ndarray:
    """(L,) index of the token whose cell covers each patch, both grids square and raster-ordered."""
    side, token_side = math.isqrt(num_patches), math.isqrt(num_tokens)
    if side * side != num_patches or token_side * token_side != num_tokens or side % token_side:
        raise ValueError(f"token_skip needs square grids with the token grid dividing the patch grid; got "
                         f"{num_patches} patches and {num_tokens} tokens.")
    pool = side // token_side
    rows, cols = np.divmod(np.arange(num_patches), side)
    return (rows // pool) * token_side + cols // pool


def _param(module, name, shape, names):
    return module.param(name, named(pos_init, names), shape)


class MaskedEncoderDecoder(nn.Module):
    num_patches: int          # L
    buffer_size: int          # n
    enc_width: int
    enc_depth: int
    enc_heads: int
    dec_width: int
    dec_depth: int
    dec_heads: int
    dropout: float = 0.1
    eps: float = 1e-6
    # Add each token's decoder row to the patch rows it covers (token grid = patch grid / pool): a
    # direct path from a token to its own patches, which attention over the prefix otherwise has to
    # learn from position embeddings alone. Off = the release's decoder.
    token_skip: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        n, L = self.buffer_size, self.num_patches
        self.z_proj = dense(self.enc_width, ("latent", "embed"), dtype=self.dtype)
        self.z_proj_ln = layer_norm(self.eps, dtype=self.dtype)
        self.enc_pos = _param(self, "encoder_pos_embed", (n + L, self.enc_width), ("seq", "embed"))
        self.fake_latent = _param(self, "fake_latent", (self.enc_width,), ("embed",))  # dummy token D
        self.encoder_blocks = [TransformerBlock(self.enc_heads, dropout=self.dropout, eps=self.eps,
                                                dtype=self.dtype) for _ in range(self.enc_depth)]
        self.encoder_norm = layer_norm(self.eps, dtype=self.dtype)
        self.decoder_embed = dense(self.dec_width, ("embed", "mlp"), dtype=self.dtype)
        self.mask_token = _param(self, "mask_token", (self.dec_width,), ("embed",))
        self.dec_pos = _param(self, "decoder_pos_embed", (n + L, self.dec_width), ("seq", "embed"))
        self.decoder_blocks = [TransformerBlock(self.dec_heads, dropout=self.dropout, eps=self.eps,
                                                dtype=self.dtype) for _ in range(self.dec_depth)]
        self.decoder_norm = layer_norm(self.eps, dtype=self.dtype)
        self.diffusion_pos = _param(self, "diffusion_pos_embed", (L, self.dec_width), ("seq", "embed"))

    def encode(self, buffer, patches, visible_idx, visible_valid, drop_buffer, *, train=False):
        """buffer (B,n,De), patches (B,L,C), window (B,V) indices/valid, drop_buffer (B,) -> (B,n+V,De).

        `visible_valid=None` means every window row is a real patch (no key mask).
        """
        n = self.buffer_size
        buffer = jnp.where(drop_buffer[:, None, None], self.fake_latent.astype(buffer.dtype), buffer)
        seen = jnp.take_along_axis(patches, visible_idx[..., None], axis=1)
        x_patch = self.z_proj(seen) + jnp.take(self.enc_pos[n:], visible_idx, axis=0)
        x = jnp.concatenate([buffer.astype(x_patch.dtype) + self.enc_pos[:n], x_patch], axis=1)
        x = self.z_proj_ln(x)
        valid = None
        if visible_valid is not None:
            valid = jnp.concatenate([jnp.ones(buffer.shape[:2], bool), visible_valid], axis=1)
        for block in self.encoder_blocks:
            x = block(x, valid, train=train)
        return self.encoder_norm(x)

    def decode(self, encoded, visible_idx, visible_valid, output_idx=None, *, train=False):
        """Encoded rows -> per-patch conditioning z: (B, L, Dd), or (B, M, Dd) at patches `output_idx` (B, M).

        Only patch rows are ever read out, so the last block computes queries (and its MLP) for the
        wanted rows alone: the L patch rows in training, the M patches being sampled in the sampler.
        """
        n, L = self.buffer_size, self.num_patches
        y = self.decoder_embed(encoded)
        b, d = y.shape[0], y.shape[-1]
        mask_token = self.mask_token.astype(y.dtype)
        rows = y[:, n:] if visible_valid is None else jnp.where(visible_valid[..., None], y[:, n:], mask_token)
        grid = jnp.broadcast_to(mask_token, (b, L, d))
        # Window indices are distinct within a sample (a slice of a permutation): a plain scatter.
        grid = grid.at[jnp.arange(b)[:, None], visible_idx].set(rows)
        if self.token_skip:
            grid = grid + jnp.take(y[:, :n], patch_to_token(L, n), axis=1)
        x = jnp.concatenate([y[:, :n], grid], axis=1) + self.dec_pos
        for block in self.decoder_blocks[:-1]:
            x = block(x, train=train)
        if output_idx is None:
            wanted, pos = slice(n, None), self.diffusion_pos
        else:
            wanted, pos = n + output_idx, jnp.take(self.diffusion_pos, output_idx, axis=0)
        x = self.decoder_blocks[-1](x, query_rows=wanted, train=train)
        return self.decoder_norm(x) + pos

    def __call__(self, buffer, patches, visible_idx, visible_valid, drop_buffer, output_idx=None, *, train=False):
        encoded = self.encode(buffer, patches, visible_idx, visible_valid, drop_buffer, train=train)
        return self.decode(encoded, visible_idx, visible_valid, output_idx, train=train)
