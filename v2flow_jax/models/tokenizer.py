"""V2Flow tokenizer = resampler + (frozen vocabulary) + cosine codebook + projector + MAR + velocity MLP.

    latents (B,h,w,C) -> resampler -> token vectors (B,n,d) -> quantizer -> codes, ids (B,n)
      -> projector -> buffer (B,n,D_enc) -> masked encoder/decoder -> z (B,L,D_dec) -> velocity MLP

`__call__` is the training loss; `encode`, `buffer_from_codes`, `buffer_from_indices`,
`decoder_features` and `velocity` are the pieces the sampler composes for reconstruction and for
decoding token ids that came from an LLM. Latents are expected already multiplied by the
autoencoder's scaling factor.
"""
from __future__ import annotations

import dataclasses
import math

import einops
import jax
import jax.numpy as jnp
from flax import linen as nn

from v2flow_jax import flow
from v2flow_jax.configuration import ConfigSection
from v2flow_jax.models import masking
from v2flow_jax.models.layers import dense
from v2flow_jax.models.mar import PRESETS, MaskedEncoderDecoder
from v2flow_jax.models.quantizer import CosineQuantizer
from v2flow_jax.models.resampler import Resampler
from v2flow_jax.models.velocity import VelocityMLP

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# encode() outputs that are not scalars: kept out of the training step's metrics.
PER_TOKEN_OUTPUTS = ("indices", "codes", "vocab_argmax", "vocab_image_probs", "vocab_image_entropy")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig(ConfigSection):
    SECTION = "model"

    """Every architectural number of the tokenizer; `from_config` reads it from `config.model`."""
    latent_size: int = 8               # h = w of the latent grid (image_size / autoencoder stride)
    latent_channels: int = 32          # C, one patch per latent pixel
    preset: str = "large"              # encoder/decoder width, depth, heads (mar.PRESETS)
    # resampler
    resampler_width: int = 512
    resampler_depth: int = 4
    pool: int = 1                      # >1 gives (h/pool)*(w/pool) tokens
    token_dim: int = 1024              # token width when the vocabulary is off
    # LLM vocabulary (vocab_size = 0: off)
    vocab_size: int = 0
    vocab_dim: int = 4096
    generator_rank: int = 0
    gumbel_tau: float = 1.0
    noisy_encode: bool = False         # the release's Gumbel noise at inference
    # Loss weight on the vocabulary information (resampler.vocabulary_statistics), subtracted from the
    # loss: keeps the vocabulary choice input-dependent (not ours alone: MAGVIT-v2's entropy loss).
    vocab_info_weight: float = 0.0
    # quantizer
    codebook_size: int = 16384
    vq_decay: float = 0.8
    vq_eps: float = 1e-5
    commit_weight: float = 1.0
    dead_code_threshold: float = 0.0
    restart_noise: float = 0.1
    # Loss weight on the codebook information (quantizer.soft_assignment_information), subtracted from
    # the loss: keeps the encoder's outputs spread over the codes, vocabulary or not.
    code_info_weight: float = 0.0
    code_info_temperature: float = 0.05
    # masked transformer
    dropout: float = 0.1
    # A direct path from each token to the patches it covers in the decoder (mar.MaskedEncoderDecoder).
    token_skip: bool = False
    # Loss weight on a linear readout of each quantized token to the latent pixels it covers (MSE), a
    # training-only head: a dense, low-variance gradient into the encoder beside the flow loss's.
    token_recon_weight: float = 0.0
    buffer_drop: float = 0.1           # per-sample probability of the dummy buffer (for guidance)
    mask_ratio_min: float = 0.7
    mask_ratio_mean: float = 1.0
    mask_ratio_std: float = 0.25
    # velocity MLP and flow loss
    velocity_width: int = 1536
    velocity_depth: int = 8
    diffusion_batch_mul: int = 4
    time_shift: float = 3.0
    dtype: str = "float32"             # compute dtype; parameters stay float32

    def validate(self):
        need = self.require
        need(self.preset in PRESETS, "preset", f"must be one of {sorted(PRESETS)}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}")
        need(self.pool >= 1 and self.latent_size % self.pool == 0, "pool",
             f"must be >= 1 and divide latent_size={self.latent_size}")
        need(self.vocab_size >= 0, "vocab_size", "must be >= 0 (0 turns the LLM vocabulary off)")
        need(self.codebook_size >= 2, "codebook_size", "must be >= 2")
        need(0.0 < self.mask_ratio_min <= 1.0, "mask_ratio_min", "must lie in (0, 1]")
        need(self.gumbel_tau > 0, "gumbel_tau", "must be > 0")
        need(0.0 <= self.buffer_drop < 1.0, "buffer_drop", "must lie in [0, 1)")
        need(self.diffusion_batch_mul >= 1, "diffusion_batch_mul", "must be >= 1")
        need(self.vocab_info_weight >= 0, "vocab_info_weight", "must be >= 0 (0 = the release's loss)")
        need(self.dead_code_threshold >= 0, "dead_code_threshold", "must be >= 0 (0 = no restarts)")
        need(self.restart_noise >= 0, "restart_noise", "must be >= 0")
        need(self.code_info_weight >= 0, "code_info_weight", "must be >= 0 (0 = the release's loss)")
        need(self.token_recon_weight >= 0, "token_recon_weight", "must be >= 0 (0 = the release's loss)")
        need(self.code_info_temperature > 0, "code_info_temperature", "must be > 0")
        width, _, heads = PRESETS[self.preset]
        need(width % heads == 0, "preset", "width must divide by heads")

    @property
    def num_patches(self) -> int:
        return self.latent_size ** 2

    @property
    def num_tokens(self) -> int:
        return (self.latent_size // self.pool) ** 2

    @property
    def code_dim(self) -> int:
        return self.vocab_dim if self.vocab_size else self.token_dim

    @property
    def max_visible(self) -> int:
        return masking.max_visible(self.num_patches, self.mask_ratio_min)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


class V2FlowTokenizer(nn.Module):
    config: TokenizerConfig

    def setup(self):
        c = self.config
        dt = c.compute_dtype
        width, depth, heads = PRESETS[c.preset]
        self.resampler = Resampler(c.resampler_width, c.resampler_depth, c.pool, c.token_dim, c.vocab_size,
                                   c.generator_rank, c.gumbel_tau, dtype=dt)
        if c.vocab_size:
            from v2flow_jax.models.vocabulary import FrozenVocabulary
            self.vocabulary = FrozenVocabulary(c.vocab_size, c.vocab_dim)
        self.quantizer = CosineQuantizer(c.codebook_size, c.code_dim, c.vq_decay, c.vq_eps, c.dead_code_threshold,
                                         c.restart_noise,
                                         c.code_info_temperature if c.code_info_weight else 0.0)
        self.projector = dense(width, ("llm_embed", "embed"), dtype=dt)
        self.mar = MaskedEncoderDecoder(c.num_patches, c.num_tokens, width, depth, heads, width, depth, heads,
                                        dropout=c.dropout, token_skip=c.token_skip, dtype=dt)
        self.velocity_mlp = VelocityMLP(c.latent_channels, c.velocity_width, c.velocity_depth, dtype=dt)
        if c.token_recon_weight:
            self.token_readout = dense(c.pool * c.pool * c.latent_channels, ("llm_embed", None), dtype=dt)

    # ---- encoding -------------------------------------------------------------------------------
    def encode(self, latents, *, train: bool = False, noisy: bool | None = None):
        """(B,h,w,C) latents -> dict(indices (B,n) int32, codes (B,n,d), commit_loss, stats...)."""
        noisy = train or (self.config.noisy_encode if noisy is None else noisy)
        table = self.vocabulary() if self.config.vocab_size else None
        vectors, aux = self.resampler(latents, table, noisy=noisy)
        codes, indices, vq_aux = self.quantizer(vectors, update=train)
        return {"indices": indices.astype(jnp.int32), "codes": codes, **aux, **vq_aux}

    def buffer_from_codes(self, codes):
        return self.projector(codes.astype(self.config.compute_dtype))

    def buffer_from_indices(self, indices):
        return self.buffer_from_codes(self.quantizer.lookup(indices))

    # ---- decoding pieces ------------------------------------------------------------------------
    def decoder_features(self, buffer, patches, visible_idx, visible_valid, drop_buffer, output_idx=None, *,
                         train=False):
        """z (B, L, D_dec), or (B, M, D_dec) at the patches `output_idx` (B, M) only."""
        return self.mar(buffer, patches, visible_idx, visible_valid, drop_buffer, output_idx, train=train)

    def velocity(self, x, t, z):
        """x (M,C), flow time t (M,) in [0,1], z (M,D) -> v (M,C)."""
        return self.velocity_mlp(x, 1000.0 * t, z)

    def velocity_condition(self, z):
        """Per-patch condition embedding, computed once and reused by every ODE step."""
        return self.velocity_mlp.embed_condition(z)

    def velocity_from_condition(self, x, t, cond_emb):
        """Like `velocity`, from `velocity_condition(z)`; t (M,) or (1,) (one time for all rows)."""
        return self.velocity_mlp.from_embeddings(x, self.velocity_mlp.embed_time(1000.0 * t), cond_emb)

    # ---- training loss --------------------------------------------------------------------------
    def __call__(self, latents, *, train: bool = True):
        """Flow loss on masked patches + commitment loss. Draws from the 'sample' and 'dropout' rngs."""
        c = self.config
        b = latents.shape[0]
        enc = self.encode(latents, train=train)
        buffer = self.buffer_from_codes(enc["codes"])
        patches = latents.reshape(b, c.num_patches, c.latent_channels).astype(jnp.float32)

        orders = masking.random_orders(self.make_rng("sample"), b, c.num_patches)
        ratio = masking.sample_mask_ratio(self.make_rng("sample"), c.mask_ratio_min, c.mask_ratio_mean,
                                          c.mask_ratio_std)
        num_masked = masking.num_masked_for(ratio, c.num_patches, c.max_visible)
        mask = masking.mask_from_order(orders, num_masked)
        vis_idx, vis_valid = masking.visible_window(orders, num_masked, c.max_visible)
        drop = jax.random.bernoulli(self.make_rng("sample"), c.buffer_drop, (b,)) if train else jnp.zeros((b,), bool)
        z = self.decoder_features(buffer, patches, vis_idx, vis_valid, drop, train=train)

        flow_loss = self.flow_loss(patches, z, mask)
        loss = flow_loss + c.commit_weight * enc["commit_loss"]
        if c.vocab_size and c.vocab_info_weight:
            loss = loss - c.vocab_info_weight * enc["vocab_information"]
        if c.code_info_weight:
            loss = loss - c.code_info_weight * enc["code_information"]
        aux = {k: v for k, v in enc.items() if k not in PER_TOKEN_OUTPUTS}
        if c.token_recon_weight:
            aux["token_recon_loss"] = self.token_recon_loss(enc["codes"], latents)
            loss = loss + c.token_recon_weight * aux["token_recon_loss"]
        aux.update(flow_loss=flow_loss, mask_ratio=num_masked / c.num_patches, loss=loss)
        return loss, aux

    def token_recon_loss(self, codes, latents):
        """MSE of the linear readout of each token (B, n, d) against its pool x pool cell of latent pixels."""
        p = self.config.pool
        cells = einops.rearrange(latents.astype(jnp.float32), "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)
        pred = self.token_readout(codes.astype(self.config.compute_dtype)).astype(jnp.float32)
        return jnp.mean((pred - cells) ** 2)

    def flow_loss(self, patches, z, mask):
        """Rectified-flow MSE, each patch repeated `diffusion_batch_mul` times; only masked patches count."""
        c = self.config
        m = c.diffusion_batch_mul
        x0 = jnp.repeat(patches.reshape(-1, c.latent_channels), m, axis=0)
        # The condition embedding is linear: embed each patch once, then repeat (not m times over).
        cond_emb = jnp.repeat(self.velocity_condition(z.reshape(-1, z.shape[-1])), m, axis=0)
        weight = jnp.repeat(mask.reshape(-1).astype(jnp.float32), m, axis=0)
        t = flow.sample_train_time(self.make_rng("sample"), (x0.shape[0],), c.time_shift)
        eps = jax.random.normal(self.make_rng("sample"), x0.shape, jnp.float32)
        v = self.velocity_from_condition(flow.interpolate(x0, eps, t[:, None]), t, cond_emb)
        per_patch = jnp.mean((v - flow.velocity_target(x0, eps)) ** 2, axis=-1)
        return jnp.sum(per_patch * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def build_tokenizer(model_config) -> V2FlowTokenizer:
    cfg = model_config if isinstance(model_config, TokenizerConfig) else TokenizerConfig.from_config(model_config)
    return V2FlowTokenizer(cfg)


def init_inputs(cfg: TokenizerConfig, batch: int = 1):
    """A dummy latent batch of the right shape for init/eval_shape."""
    return jnp.zeros((batch, cfg.latent_size, cfg.latent_size, cfg.latent_channels), jnp.float32)


def init_variables(model: V2FlowTokenizer, rng, batch: int = 1):
    """All variable collections ('params', 'vq', 'frozen'); pure, so it can be eval_shape'd and jitted."""
    p, s, d = jax.random.split(rng, 3)
    return model.init({"params": p, "sample": s, "dropout": d}, init_inputs(model.config, batch), train=False)


def count_parameters(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
