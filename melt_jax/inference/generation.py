"""jit-compiled generation for Ouro and MELT over a fixed-size KV cache.

    result = generate(model, params, [[12, 7, 99], [5]], SamplingConfig(max_new_tokens=32))
    result.tokens        # per prompt, the new tokens (without the prompt or the stop token)
    result.stop_reasons  # per prompt: 'stop_token', 'length' or 'stopped' (asked by `on_segment`)

How a batch of prompts of different lengths is run:
1. Host: validate everything (`GenerationError`) and round the three sizes up to buckets, so that the
   compiled programs depend on the buckets only, not on the request: the longest prompt to a length
   P and max_new_tokens to a length N (each the smallest of `buckets` that fits, and P + N within the
   model's max_position_embeddings), the number of prompts to a batch B (the smallest of
   `batch_buckets`). Prompts are right-padded with id 0 to P; the B - len(prompts) padding rows are
   one pad token each with a limit of 0 new tokens: done from the start, they never record a token,
   never keep the decode loop running, and their results are dropped.
2. `start_generation` (one jit): prefill all P positions into an empty cache of P + N slots, in
   chunks of `chunk_size` starting at position 0 (MELT: default config.chunk_size; Ouro: the
   whole prompt at once, any chunking gives the same values); keep the hidden state at each row's last
   real position, set the cache's end_index to the true lengths, and sample the first new token.
   This is exact: a real token at position p only attends to slots <= p, which hold real tokens, and
   for MELT the chunk boundaries are the ones the prompt alone would have. Pad slots at positions
   >= length are never visible to real tokens and are overwritten by the decoded ones. Rows never
   attend to each other, so padding rows change nothing in the real ones.
3. `decode_until` (one jit): a `lax.while_loop` of one-token decode steps (MELT: chunk size 1), each row
   fed its last token at its own position, with per-row done flags (a stop token, or the row's limit
   of max_new_tokens, a traced value, reached), writing into a fixed [B, N] buffer. Finished rows keep
   running (fixed shapes) but record nothing; the loop ends when every row is done. With
   `segment_steps` the same loop is run segment by segment and `on_segment` sees the tokens after each
   one: that is how the command line streams.

Random draws: each request has its own seed, as in serving engines (vLLM's per-request seed): row b's
seed is `seeds[b]`, or sampling.seed for every row when `seeds` is not given, and the row draws its new
token i with the key fold_in(key(seed of row b), i). A row's tokens therefore depend only on its prompt
and its seed, never on its position in the batch, the other prompts or the buckets: a prompt sampled
in a batch gives exactly what it gives alone with the same seed. Two copies of one prompt with one
seed give the same tokens; to draw several samples of a prompt, give the copies different seeds.
Greedy decoding does not depend on the seed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from melt_jax.errors import ConfigError, GenerationError
from melt_jax.inference.decode_loop import DecodeState, decode_until, start_generation
from melt_jax.inference.param_check import check_params
from melt_jax.inference.sampling import SamplingConfig
from melt_jax.model.chunking import check_chunk_size
from melt_jax.model.exit import ExitPolicy

Array = jax.Array


DEFAULT_BUCKETS = tuple(2**i for i in range(4, 17))  # 16 .. 65536: prompt lengths and max_new_tokens


DEFAULT_BATCH_BUCKETS = tuple(2**i for i in range(11))  # 1 .. 1024 rows


STOP_SLOTS = 8  # stop-token lists are padded to a multiple of this


PAD_ID = 0  # prompt padding (any id works: pad positions are never seen by real tokens)


STOP_TOKEN, LENGTH, STOPPED = "stop_token", "length", "stopped"


@dataclasses.dataclass(frozen=True)
class GenerationTiming:
    """Wall-clock seconds of one `generate` call; compile times are separate from run times.

    decode_tokens counts the tokens produced by decode steps (every row's new tokens after the first,
    which comes from the prefill); decode_steps the steps run (each feeds one token to every row) and
    decode_loops the loops they computed (T each, fewer under an exit policy that skips loops)."""

    compile_s: float
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    decode_tokens: int
    decode_steps: int = 0
    decode_loops: int = 0

    @property
    def loops_per_step(self) -> float:
        """Mean loops computed per decode step (NaN without decode steps)."""
        return self.decode_loops / self.decode_steps if self.decode_steps else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    tokens: list[list[int]]  # per prompt: new tokens, without the prompt and the stop token
    stop_reasons: list[str]  # per prompt: STOP_TOKEN, LENGTH or STOPPED
    timing: GenerationTiming


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


def _timed(fn, *args):
    """(fn(*args) with its outputs ready, seconds)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def _compiled(jitted, *args, **static):
    """(the jitted function lowered and compiled for these arguments, seconds). Compilations are
    cached by JAX, so a second call with the same shapes and static arguments costs no time."""
    start = time.perf_counter()
    compiled = jitted.lower(*args, **static).compile()
    return compiled, time.perf_counter() - start


def _tokens_so_far(state: DecodeState, rows: int) -> list[list[int]]:
    """The new tokens of the first `rows` rows (the prompts; the padding rows are left out)."""
    out, num_new = jax.device_get((state.out, state.num_new))
    return [out[b, : num_new[b]].tolist() for b in range(rows)]


def _decode_in_segments(
    decode, params, state: DecodeState, rows: int, segment_steps: int | None, on_segment
) -> tuple[DecodeState, float]:
    """Runs the compiled decode loop to the end, in segments of `segment_steps` with `on_segment`
    called before each on the first `rows` rows (see `generate`). Returns (final state, seconds
    spent decoding)."""
    batch, max_new = state.out.shape
    seconds = 0.0
    while True:
        if on_segment is not None:
            stop_rows = on_segment(_tokens_so_far(state, rows))
            if stop_rows is not None:
                stop_rows = np.asarray(stop_rows, bool)
                if stop_rows.shape != (rows,):
                    raise GenerationError(f"on_segment returned {stop_rows.size} flags for {rows} rows")
                stop_rows = np.concatenate([stop_rows, np.zeros((batch - rows,), bool)])  # [B]
                state = state.replace(done=state.done | stop_rows)
        step, all_done = jax.device_get((state.step, jnp.all(state.done)))
        if step >= max_new or all_done:
            return state, seconds
        until = max_new if segment_steps is None else min(int(step) + segment_steps, max_new)
        state, segment_s = _timed(decode, params, state, np.int32(until))
        seconds += segment_s


def _outputs(state: DecodeState, rows: int, max_new: int) -> tuple[list[list[int]], list[str]]:
    """Per prompt (the first `rows` rows): the new tokens without the stop token, and why the row ended."""
    tokens, reasons = [], []
    for row, stopped in zip(_tokens_so_far(state, rows), jax.device_get(state.hit_stop)):
        tokens.append(row[:-1] if stopped else row)
        reasons.append(STOP_TOKEN if stopped else LENGTH if len(row) >= max_new else STOPPED)
    return tokens, reasons


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


def run_request(
    model: nn.Module,
    request: Request,
    start_program,
    decode_program,
    start_static: dict,
    decode_static: dict,
    segment_steps: int | None = None,
    on_segment=None,
) -> tuple[DecodeState, GenerationResult]:
    """Compiles and runs a start program (`start_generation`'s arguments, its static ones in
    start_static beside chunk_size and max_new) and a decode program (`decode_until`'s: params, state,
    until_step, then decode_static) on `request`, the decode loop in segments as `generate` says.
    Returns (the final state, the result; its decode_steps are the decode program's steps, state.step
    - 1)."""
    static = dict(start_static, chunk_size=request.chunk, max_new=request.new_slots)
    start, start_compile_s = _compiled(start_program, model, *request.start_args, **static)
    state, prefill_s = _timed(start, *request.start_args)
    decode, decode_compile_s = _compiled(decode_program, model, request.params, state, np.int32(0), **decode_static)
    state, decode_s = _decode_in_segments(decode, request.params, state, request.rows, segment_steps, on_segment)
    results, reasons = _outputs(state, request.rows, request.max_new)
    timing = GenerationTiming(
        compile_s=start_compile_s + decode_compile_s,
        prefill_s=prefill_s,
        decode_s=decode_s,
        prompt_tokens=int(request.lengths[: request.rows].sum()),
        decode_tokens=int(np.maximum(jax.device_get(state.num_new) - 1, 0).sum()),
        decode_steps=max(int(jax.device_get(state.step)) - 1, 0),
        decode_loops=int(jax.device_get(state.loops)),
    )
    return state, GenerationResult(tokens=results, stop_reasons=reasons, timing=timing)


def generate(
    model: nn.Module,
    params,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig = SamplingConfig(),
    *,
    exit_policy: ExitPolicy = ExitPolicy(),
    chunk_size: int | None = None,
    buckets: Sequence[int] | None = DEFAULT_BUCKETS,
    batch_buckets: Sequence[int] | None = DEFAULT_BATCH_BUCKETS,
    seeds: Sequence[int] | None = None,
    segment_steps: int | None = None,
    on_segment: Callable[[list[list[int]]], Sequence[bool] | None] | None = None,
) -> GenerationResult:
    """Generates up to sampling.max_new_tokens tokens after each prompt (lists of token ids).

    exit_policy         which loop's logits choose the tokens (Ouro and MELT run all loops)
    chunk_size          chunk of the prompt prefill (default config.default_chunk_size: MELT's
                        chunk_size, 1 = exactly token-by-token decoding; Ouro: the whole prompt, its
                        values do not depend on it)
    buckets             the longest prompt and max_new_tokens are each rounded up to one of these
                        (the prompt buffer and the new-token buffer), so that requests of other
                        lengths reuse the compiled programs (None: exact sizes)
    batch_buckets       the batch is padded with rows whose results are dropped up to one of these,
                        so that other numbers of prompts reuse the compiled programs (None: exact)
    seeds               one seed per prompt (None: sampling.seed for every prompt); a prompt's
                        tokens depend only on the prompt and its seed, see the module docstring
    segment_steps       run the decode loop this many steps at a time, calling on_segment(tokens per
                        row so far, stop tokens included) after the prefill and after every segment;
                        on_segment may return a list of bools, the rows to finish now (e.g. on a stop
                        string). Without segment_steps the loop runs to the end in one call.
    Raises GenerationError on bad input before anything is compiled.
    """
    request = prepare_request(
        model,
        params,
        prompts,
        sampling,
        exit_policy=exit_policy,
        chunk_size=chunk_size,
        buckets=buckets,
        batch_buckets=batch_buckets,
        seeds=seeds,
        segment_steps=segment_steps,
    )
    static = dict(exit_policy=exit_policy, rule=sampling.token_rule)
    _, result = run_request(model, request, start_generation, decode_until, static, static, segment_steps, on_segment)
    return result
