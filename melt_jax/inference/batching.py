"""Validating a generation request and laying it out for the compiled programs: the prompts padded
to a bucketed length, the batch to a bucketed number of rows, each row's limit, seed and the stop ids
(step 1 of `generate`, melt_jax/inference/generation.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from melt_jax.errors import ConfigError, GenerationError
from melt_jax.inference.param_check import check_params
from melt_jax.inference.sampling import SamplingConfig
from melt_jax.model.chunking import check_chunk_size
from melt_jax.model.exit import ExitPolicy

DEFAULT_BUCKETS = tuple(2**i for i in range(4, 17))  # 16 .. 65536: prompt lengths and max_new_tokens


DEFAULT_BATCH_BUCKETS = tuple(2**i for i in range(11))  # 1 .. 1024 rows


STOP_SLOTS = 8  # stop-token lists are padded to a multiple of this


PAD_ID = 0  # prompt padding (any id works: pad positions are never seen by real tokens)


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    """The prompts as lists of ints; GenerationError for no prompts, an empty prompt, or an id
    outside [0, vocab_size)."""
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise GenerationError("expected a non-empty list of prompts, each a list of token ids")
    checked = []
    for i, prompt in enumerate(prompts):
        try:
            ids = np.asarray(prompt)
        except Exception:
            raise GenerationError(f"prompt {i} is not a sequence of token ids") from None
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise GenerationError(f"prompt {i} must be a flat list of integer token ids, got {str(prompt)[:60]}")
        if ids.size == 0:
            raise GenerationError(f"prompt {i} is empty; a prompt needs at least one token")
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.size:
            raise GenerationError(
                f"prompt {i} has token ids {bad[:5].tolist()} outside the vocabulary [0, {vocab_size})"
            )
        checked.append(ids.astype(np.int64).tolist())
    return checked


def bucket_length(length: int, buckets: Sequence[int] | None) -> int:
    """The smallest bucket >= length, or length rounded up to a multiple of the largest bucket when
    none fits; `length` itself when buckets is None."""
    if not buckets:
        return length
    fitting = [b for b in sorted(buckets) if b >= length]
    if fitting:
        return fitting[0]
    largest = max(buckets)
    return -(-length // largest) * largest


def _positive_int_or_none(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise GenerationError(f"{name} must be a positive integer, got {value!r}")


def _check_buckets(name: str, buckets) -> None:
    if buckets is None:
        return
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence) or not len(buckets):
        raise GenerationError(f"{name} must be a non-empty list of positive integers or None, got {buckets!r}")
    for b in buckets:
        _positive_int_or_none(f"each of {name}", b)


def _row_seeds(seeds: Sequence[int] | None, sampling: SamplingConfig, num_prompts: int) -> list[int]:
    """Each prompt's seed: `seeds` (one 32-bit integer per prompt), or sampling.seed for every prompt
    when it is None."""
    if seeds is None:
        return [sampling.seed] * num_prompts
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or len(seeds) != num_prompts:
        raise GenerationError(f"seeds must be a list of one integer per prompt ({num_prompts}), got {seeds!r}")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not -(2**31) <= seed < 2**31:
            raise GenerationError(f"each seed must be a 32-bit integer, got {seed!r}")
    return [int(seed) for seed in seeds]


def _check_setup(
    model, sampling: SamplingConfig, exit_policy: ExitPolicy, chunk_size, segment_steps, longest: int
) -> int | None:
    """Validates the settings; returns the prefill chunk size (None: the whole prompt)."""
    c = model.config
    if not isinstance(exit_policy, ExitPolicy):
        raise GenerationError(f"exit_policy must be an ExitPolicy, got {exit_policy!r}")
    try:
        exit_policy.validate(c.num_loops)
    except ValueError as e:
        raise GenerationError(str(e)) from None
    if sampling.vocab_limit is not None and sampling.vocab_limit > c.vocab_size:
        raise GenerationError(f"vocab_limit {sampling.vocab_limit} is above the model's vocabulary size {c.vocab_size}")
    bad_stops = [i for i in sampling.stop_token_ids if not 0 <= i < c.vocab_size]
    if bad_stops:
        raise GenerationError(f"stop token ids {bad_stops} are outside the vocabulary [0, {c.vocab_size})")
    total = longest + sampling.max_new_tokens
    if total > c.max_position_embeddings:
        raise GenerationError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens ({sampling.max_new_tokens}) is {total}, "
            f"more than the model's max_position_embeddings ({c.max_position_embeddings})"
        )
    _positive_int_or_none("segment_steps", segment_steps)
    if chunk_size is None:
        return c.default_chunk_size
    try:
        return check_chunk_size(chunk_size)
    except ConfigError as e:
        raise GenerationError(str(e)) from None


def _pad_prompts(prompts: list[list[int]], length: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [batch, length] right-padded with PAD_ID, lengths int32 [batch]); the rows after
    the prompts are one PAD_ID token each."""
    tokens = np.full((batch, length), PAD_ID, np.int32)
    lengths = np.ones((batch,), np.int32)
    for b, prompt in enumerate(prompts):
        tokens[b, : len(prompt)] = prompt
        lengths[b] = len(prompt)
    return tokens, lengths


def _pad_rows(values: Sequence[int], batch: int, fill: int) -> np.ndarray:
    """int32 [batch]: values, then `fill` for the padding rows."""
    return np.array(list(values) + [fill] * (batch - len(values)), np.int32)


def _pad_stop_ids(stop_ids: tuple[int, ...]) -> np.ndarray:
    """int32 [n] with n a multiple of STOP_SLOTS (at least one), padded with -1 (never produced), so
    that lists of up to STOP_SLOTS stop tokens share one compiled program."""
    size = max(-(-len(stop_ids) // STOP_SLOTS), 1) * STOP_SLOTS
    return np.array(list(stop_ids) + [-1] * (size - len(stop_ids)), np.int32)


@dataclasses.dataclass(frozen=True)
class Request:
    """Prompts validated and laid out for the compiled programs (step 1 of the module docstring).

    tokens [B, P] right-padded prompts, lengths [B], limits [B] (0 for the padding rows), seeds [B],
    stop_ids [n]; rows: the number of prompts (the first rows); chunk: the prefill chunk; new_slots:
    N, the new-token buffer; max_new: sampling.max_new_tokens."""

    params: Any
    tokens: np.ndarray
    lengths: np.ndarray
    limits: np.ndarray
    seeds: np.ndarray
    stop_ids: np.ndarray
    rows: int
    chunk: int
    new_slots: int
    max_new: int

    @property
    def start_args(self) -> tuple:
        """The traced arguments of a start program (`start_generation`) after the model."""
        return (self.params, self.tokens, self.lengths, self.limits, self.seeds, self.stop_ids)


def prepare_request(
    model: nn.Module,
    params,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    *,
    exit_policy: ExitPolicy,
    chunk_size: int | None,
    buckets: Sequence[int] | None,
    batch_buckets: Sequence[int] | None,
    seeds: Sequence[int] | None,
    segment_steps: int | None,
) -> Request:
    """Validates a request (GenerationError before anything is compiled) and lays it out in buckets;
    the arguments are `generate`'s."""
    check_params(model, params)
    prompts = check_prompts(prompts, model.config.vocab_size)
    longest = max(len(p) for p in prompts)
    chunk_size = _check_setup(model, sampling, exit_policy, chunk_size, segment_steps, longest)

    _check_buckets("buckets", buckets)
    _check_buckets("batch_buckets", batch_buckets)
    seeds = _row_seeds(seeds, sampling, len(prompts))

    # P first, then N in the room left: each falls back to its exact size where its bucket would take
    # the cache past max_position_embeddings (the longest prompt + max_new_tokens always fit).
    max_new, room = sampling.max_new_tokens, model.config.max_position_embeddings
    padded = min(bucket_length(longest, buckets), max(longest, room - max_new))
    new_slots = min(bucket_length(max_new, buckets), max(max_new, room - padded))
    batch = bucket_length(len(prompts), batch_buckets)
    tokens, lengths = _pad_prompts(prompts, padded, batch)  # [B, P], [B]
    return Request(
        params=jax.tree.map(jnp.asarray, params),
        tokens=tokens,
        lengths=lengths,
        limits=_pad_rows([max_new] * len(prompts), batch, 0),  # [B]: padding rows are done at once
        seeds=_pad_rows(seeds, batch, 0),
        stop_ids=_pad_stop_ids(sampling.stop_token_ids),
        rows=len(prompts),
        chunk=padded if chunk_size is None else min(chunk_size, padded),
        new_slots=new_slots,
        max_new=max_new,
    )
