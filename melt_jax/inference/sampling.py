"""Choosing the next token from logits: greedy, temperature, top-k and top-p, with per-row random keys."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from melt_jax.errors import GenerationError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen and when generation ends.

    temperature     0 = greedy (argmax); else sample from softmax(logits / temperature)
    top_k           keep only the k largest logits (None or 0: all)
    top_p           keep the smallest set of most likely tokens whose probability reaches top_p
                    (None or 1.0: all); applied after top_k
    max_new_tokens  most new tokens per prompt, the stop token included
    stop_token_ids  a row ends when it produces one of these (the stop token is not returned)
    seed            seed of every prompt's random draws (`generate(..., seeds=...)` gives one per
                    prompt instead): a prompt's tokens depend only on the prompt and its seed, not
                    on the batch it is in
    vocab_limit     only ids below this are produced (None: all), e.g. the tokenizer's size when the
                    model's vocabulary is padded beyond it
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0
    vocab_limit: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        if not self.temperature >= 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise GenerationError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.seed, int) or not -(2**31) <= self.seed < 2**31:
            raise GenerationError(f"seed must be a 32-bit integer, got {self.seed!r}")
        if self.vocab_limit is not None and (not isinstance(self.vocab_limit, int) or self.vocab_limit < 1):
            raise GenerationError(f"vocab_limit must be a positive integer, got {self.vocab_limit!r}")

    @property
    def token_rule(self) -> TokenRule:
        top_p = None if self.top_p in (None, 1.0) else self.top_p
        return TokenRule(self.temperature, self.top_k or None, top_p, self.vocab_limit)


@dataclasses.dataclass(frozen=True)
class TokenRule:
    """The static part of SamplingConfig that the compiled programs depend on."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    vocab_limit: int | None = None


# --------------------------------------------------------------------------------------------------
# Choosing the next token: small pure functions on logits [B, V]


def top_k_filter(logits: Array, k: int) -> Array:
    """logits [B, V] with all but the k largest of each row set to -inf (ties with the k-th kept)."""
    kth = jax.lax.top_k(logits, k)[0][:, -1:]  # [B, 1]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: Array, p: float) -> Array:
    """logits [B, V] keeping, per row, the most likely tokens up to and including the first one at
    which their total probability reaches p; the rest -inf."""
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
    kept = jnp.where(before < p, ordered, jnp.inf)  # the first is always kept
    cutoff = jnp.min(kept, axis=-1, keepdims=True)  # [B, 1] smallest kept logit
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def next_tokens(logits: Array, keys: Array, rule: TokenRule) -> Array:
    """One token per row, int32 [B], from logits [B, V] with per-row keys [B]."""
    logits = logits.astype(jnp.float32)
    if rule.vocab_limit is not None and rule.vocab_limit < logits.shape[-1]:
        logits = logits.at[:, rule.vocab_limit :].set(-jnp.inf)
    if rule.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / rule.temperature
    if rule.top_k is not None and rule.top_k < logits.shape[-1]:
        logits = top_k_filter(logits, rule.top_k)
    if rule.top_p is not None:
        logits = top_p_filter(logits, rule.top_p)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def draw_keys(row_keys: Array, index: Array) -> Array:
    """The keys [B] of new-token `index` from the per-row keys [B]: fold_in(row key, index)."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, index)
