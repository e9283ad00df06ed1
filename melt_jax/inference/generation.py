"""jit-compiled generation for Ouro and MELT over a fixed-size KV cache.

    result = generate(model, params, [[12, 7, 99], [5]], SamplingConfig(max_new_tokens=32))
    result.tokens        # per prompt, the new tokens (without the prompt or the stop token)
    result.stop_reasons  # per prompt: 'stop_token', 'length' or 'stopped' (ended by `GenerationRun.finish`)

    run = generation_run(model, params, prompts, sampling, segment_steps=4)
    for rows in run:         # each prompt's new tokens so far, after the prefill and every segment
        run.finish(flags)    # optional: one bool per prompt, the rows to end now (e.g. on a stop string)
    result = run.result()

How a batch of prompts of different lengths is run:
1. Host (melt_jax/inference/batching.py): validate everything (`GenerationError`) and round the
   three sizes up to buckets, so that the compiled programs depend on the buckets only, not on the
   request: the longest prompt to a length P and max_new_tokens to a length N (each the smallest of
   `buckets` that fits, and P + N within the model's max_position_embeddings), the number of prompts
   to a batch B (the smallest of `batch_buckets`). Prompts are right-padded with id 0 to P; the
   B - len(prompts) padding rows are one pad token each with a limit of 0 new tokens: done from the
   start, they never record a token, never keep the decode loop running, and their results are
   dropped.
2. `start_generation` (one jit, melt_jax/inference/decoding.py): prefill all P positions into an
   empty cache of P + N slots, in chunks of `chunk_size` starting at position 0 (MELT: default
   config.chunk_size; Ouro: the whole prompt at once, any chunking gives the same values); keep the
   hidden state at each row's last real position, set the cache's end_index to the true lengths,
   and sample the first new token. This is exact: a real token at position p only attends to slots
   <= p, which hold real tokens, and for MELT the chunk boundaries are the ones the prompt alone
   would have. Pad slots at positions >= length are never visible to real tokens and are
   overwritten by the decoded ones. Rows never attend to each other, so padding rows change nothing
   in the real ones.
3. `decode_until` (one jit): a `lax.while_loop` of one-token decode steps (MELT: chunk size 1), each row
   fed its last token at its own position, with per-row done flags (a stop token, or the row's limit
   of max_new_tokens, a traced value, reached), writing into a fixed [B, N] buffer. Finished rows keep
   running (fixed shapes) but record nothing; the loop ends when every row is done. With
   `segment_steps` the same loop is run segment by segment: a `GenerationRun` gives the tokens after
   each one as it is iterated (melt_jax/inference/text_generation.py streams text from it).

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
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from melt_jax.errors import GenerationError
from melt_jax.inference.batching import DEFAULT_BATCH_BUCKETS, DEFAULT_BUCKETS, Request, prepare_request
from melt_jax.inference.decoding import DecodeState, decode_until, start_generation
from melt_jax.inference.sampling import SamplingConfig
from melt_jax.model.exit import ExitPolicy

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


def _outputs(state: DecodeState, rows: int, max_new: int) -> tuple[list[list[int]], list[str]]:
    """Per prompt (the first `rows` rows): the new tokens without the stop token, and why the row ended."""
    tokens, reasons = [], []
    for row, stopped in zip(_tokens_so_far(state, rows), jax.device_get(state.hit_stop)):
        tokens.append(row[:-1] if stopped else row)
        reasons.append(STOP_TOKEN if stopped else LENGTH if len(row) >= max_new else STOPPED)
    return tokens, reasons


class GenerationRun:
    """A request on its compiled programs: the prefill runs when it is made, the decode loop as it is
    iterated, segment by segment (see `generate`).

        run = generation_run(model, params, prompts, sampling, segment_steps=4)
        for rows in run:       # each prompt's new tokens so far, after the prefill and every segment
            run.finish(flags)  # optional: one bool per prompt, the rows to end now
        result = run.result()  # runs whatever is left

    `start_program` and `decode_program` take `start_generation`'s and `decode_until`'s arguments,
    their static ones in start_static (beside chunk_size and max_new) and decode_static."""

    def __init__(
        self,
        model: nn.Module,
        request: Request,
        start_program,
        decode_program,
        start_static: dict,
        decode_static: dict,
        segment_steps: int | None = None,
    ):
        self.request, self.segment_steps = request, segment_steps
        static = dict(start_static, chunk_size=request.chunk, max_new=request.new_slots)
        start, start_compile_s = _compiled(start_program, model, *request.start_args, **static)
        self.state, self.prefill_s = _timed(start, *request.start_args)
        self.decode, decode_compile_s = _compiled(
            decode_program, model, request.params, self.state, np.int32(0), **decode_static
        )
        self.compile_s = start_compile_s + decode_compile_s
        self.decode_s = 0.0

    def tokens(self) -> list[list[int]]:
        """Each prompt's new tokens so far (stop tokens included)."""
        return _tokens_so_far(self.state, self.request.rows)

    def finish(self, rows: Sequence[bool]) -> None:
        """Ends the prompts whose flag is set (e.g. on a stop string): they record no more tokens."""
        count = self.request.rows
        flags = np.asarray(rows, bool)
        if flags.shape != (count,):
            raise GenerationError(f"expected one stop flag per prompt, got {flags.size} flags for {count} rows")
        batch = self.state.out.shape[0]
        flags = np.concatenate([flags, np.zeros((batch - count,), bool)])  # [B]
        self.state = self.state.replace(done=self.state.done | flags)

    def advance(self) -> bool:
        """Runs the next segment of the decode loop (all of it without segment_steps); False, and
        nothing run, once every row is done or the new-token buffer is full."""
        max_new = self.state.out.shape[1]
        step, all_done = jax.device_get((self.state.step, jnp.all(self.state.done)))
        if step >= max_new or all_done:
            return False
        until = max_new if self.segment_steps is None else min(int(step) + self.segment_steps, max_new)
        self.state, segment_s = _timed(self.decode, self.request.params, self.state, np.int32(until))
        self.decode_s += segment_s
        return True

    def __iter__(self) -> Iterator[list[list[int]]]:
        yield self.tokens()
        while self.advance():
            yield self.tokens()

    def result(self) -> GenerationResult:
        """Runs the decode loop to the end; the result (its decode_steps are the decode program's
        steps, state.step - 1)."""
        while self.advance():
            pass
        request, state = self.request, self.state
        tokens, reasons = _outputs(state, request.rows, request.max_new)
        timing = GenerationTiming(
            compile_s=self.compile_s,
            prefill_s=self.prefill_s,
            decode_s=self.decode_s,
            prompt_tokens=int(request.lengths[: request.rows].sum()),
            decode_tokens=int(np.maximum(jax.device_get(state.num_new) - 1, 0).sum()),
            decode_steps=max(int(jax.device_get(state.step)) - 1, 0),
            decode_loops=int(jax.device_get(state.loops)),
        )
        return GenerationResult(tokens=tokens, stop_reasons=reasons, timing=timing)


def generation_run(
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
) -> GenerationRun:
    """A request prefilled, with its decode loop still to run segment by segment as the returned
    GenerationRun is iterated; `result()` runs the rest.

    exit_policy         which loop's logits choose the tokens (Ouro and MELT run all loops)
    chunk_size          chunk of the prompt prefill (default config.default_chunk_size: MELT's
                        chunk_size, 1 = exactly token-by-token decoding; Ouro: 256 tokens, its
                        values do not depend on it: chunks bound the prefill's memory)
    buckets             the longest prompt and max_new_tokens are each rounded up to one of these
                        (the prompt buffer and the new-token buffer), so that requests of other
                        lengths reuse the compiled programs (None: exact sizes)
    batch_buckets       the batch is padded with rows whose results are dropped up to one of these,
                        so that other numbers of prompts reuse the compiled programs (None: exact)
    seeds               one seed per prompt (None: sampling.seed for every prompt); a prompt's
                        tokens depend only on the prompt and its seed, see the module docstring
    segment_steps       decode steps per segment (None: the whole loop is one segment)
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
    return GenerationRun(model, request, start_generation, decode_until, static, static, segment_steps)


def generate(
    model: nn.Module, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(), **options
) -> GenerationResult:
    """Generates up to sampling.max_new_tokens tokens after each prompt (lists of token ids): the
    request of `generation_run` (same options) run to the end."""
    return generation_run(model, params, prompts, sampling, **options).result()
