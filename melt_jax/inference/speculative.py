"""Self-speculative greedy decoding for Ouro and MELT: the first loops draft, all loops verify.

    result = generate_speculative(model, params, [[12, 7, 99], [5]], SamplingConfig(max_new_tokens=32),
                                  draft_loops=1, block=4)
    result.tokens, result.stats.acceptance_rate

The prompts are prefilled as `generate` does (melt_jax/inference/generation.py: buckets, padding rows,
the first new token from the prefill, all loops); then a `lax.while_loop` runs rounds. In a round
every row b, whose last recorded token `last` sits at position e_b (its end index; the cache holds
the rows of the positions before it), goes through:

1. Draft: k = `block` one-token decode steps that compute loops 0..d-1 only (d = `draft_loops`: the
   exit policy `ExitPolicy.at_loop(d - 1, skip_loops=True)`), each choosing the argmax of loop d-1's
   logits: x_1 .. x_k. They write draft rows at positions e_b .. e_b + k - 1 (Ouro: the slots of
   loops >= d copy loop d-1's rows; MELT: the shared row is loop d-1's gated row).
2. Verify: one forward of all T loops over the block [last, x_1, .., x_k] at positions e_b .. e_b + k,
   with the end index back at e_b. Its queries see the cache slots before e_b only
   (attention.masks.history_and_own_mask hides every slot at or after the first position in flight), so
   the draft rows are never read, and it writes the rows of all k + 1 positions anew. y_i, the argmax
   of the last loop's logits at position e_b + i, is the verifier's token for position e_b + i + 1.
3. Accept: n_b = the number of leading i with x_{i+1} == y_i. The row records y_0 .. y_{n_b} (the
   n_b agreeing drafts, then the verifier's own next token), fewer where it reaches its limit or a stop
   token, and its end index moves past the recorded tokens' predecessors: e_b + (tokens recorded). The
   rows kept are the verifier's; the ones beyond the new end index are hidden by the same mask and
   overwritten by the next round. Rows of the batch accept different numbers of tokens: every row has
   its own end index, and the block's positions are each row's own.

What the output equals (docs/melt.md, 'Self-speculative decoding'):
- Ouro: the tokens of greedy decoding with all loops (`generate` at temperature 0, exit policy last).
  A position's rows and logits depend only on the tokens up to it, whether a forward takes one token
  or a block; the drafts only decide how many tokens a round keeps.
- MELT: the verifier's block is one chunk (its tokens see each other's loop-t rows), so the output is
  greedy decoding of the chunked model whose chunks are the prompt's prefill chunks followed by each
  round's recorded block: round r covers the positions from the token it started from up to the one
  before its last recorded token. Every new token is the argmax of the last loop's logits at the
  position before it in the chunked forward of (prompt + new tokens) with those chunk boundaries, the
  first new token coming from the prefill. A chunk [e, e + c) computes the same values at its
  positions as the verifier's [e, e + k] does (causal within the chunk), so this is exact. The
  boundaries depend on the drafts: `SpeculativeResult.token_rounds` gives them.

Greedy only: a temperature above 0 is a GenerationError.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from melt_jax.errors import GenerationError
from melt_jax.inference.batching import DEFAULT_BATCH_BUCKETS, DEFAULT_BUCKETS, prepare_request
from melt_jax.inference.decoding import DecodeState, start_generation
from melt_jax.inference.generation import GenerationResult, GenerationRun
from melt_jax.inference.sampling import SamplingConfig, TokenRule, next_tokens
from melt_jax.model.exit import ExitPolicy

Array = jax.Array


@flax.struct.dataclass
class SpeculativeState(DecodeState):
    """DecodeState plus what rounds count. step is 1 + the rounds run (the prefill's token is step 0);
    loops counts the loops the rounds computed (k * d drafting, T verifying, per round).

    drafted: [B] tokens drafted while the row was not done (k per round); accepted: [B] drafted tokens
    recorded; token_rounds: [B, N] the round that recorded each new token (0: the prefill), valid up
    to num_new."""

    drafted: Array
    accepted: Array
    token_rounds: Array


@dataclasses.dataclass(frozen=True)
class SpeculativeStats:
    """Counts over the prompts' rows of one `generate_speculative` call.

    rounds: rounds run (each drafts and verifies for every row at once); row_rounds: rounds summed over
    the rows that were not done; drafted: drafted tokens (block per row round); accepted: drafted tokens
    recorded (the verifier agreed with them)."""

    rounds: int
    row_rounds: int
    drafted: int
    accepted: int

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (NaN without drafts)."""
        return self.accepted / self.drafted if self.drafted else float("nan")


@dataclasses.dataclass(frozen=True)
class SpeculativeResult(GenerationResult):
    """GenerationResult (timing.decode_steps counts rounds) plus the acceptance counts and, per prompt,
    the round that recorded each new token (0: the prefill; the stop token's entry is dropped with it)."""

    stats: SpeculativeStats | None = None
    token_rounds: list[list[int]] | None = None


def _greedy(logits: Array, rule: TokenRule) -> Array:
    """The argmax tokens [B, S] of logits [B, S, V] under `rule` (greedy: its vocab_limit only)."""
    batch, seq, vocab = logits.shape
    return next_tokens(logits.reshape(batch * seq, vocab), None, rule).reshape(batch, seq)


def _record_block(state: SpeculativeState, tokens: Array, proposed: Array) -> tuple[SpeculativeState, Array]:
    """Records, in every row that is not done, the first proposed[b] of tokens [B, W] as its next new
    tokens, stopping after a stop token or at the row's limit. Returns (state, tokens recorded [B])."""
    batch, width = tokens.shape
    index = jnp.arange(width)[None, :]  # [1, W]
    is_stop = jnp.any(tokens[:, :, None] == state.stop_ids[None, None, :], axis=-1)  # [B, W]
    stop_before = (jnp.cumsum(is_stop, axis=1) - is_stop) > 0  # a stop token earlier in the block
    recorded = (
        ~state.done[:, None]
        & (index < proposed[:, None])
        & (state.num_new[:, None] + index < state.limit[:, None])
        & ~stop_before
    )  # [B, W], a prefix of each row
    count = jnp.sum(recorded, axis=1).astype(jnp.int32)  # [B]
    column = jnp.where(recorded, state.num_new[:, None] + index, state.out.shape[1])  # [B, W]: past the end drops
    rows = jnp.arange(batch)[:, None]  # [B, 1]
    hit_stop = jnp.any(recorded & is_stop, axis=1)
    num_new = state.num_new + count
    last = jnp.take_along_axis(tokens, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]  # [B]
    state = state.replace(
        last=jnp.where(count > 0, last, state.last),
        out=state.out.at[rows, column].set(tokens, mode="drop"),
        token_rounds=state.token_rounds.at[rows, column].set(state.step, mode="drop"),
        num_new=num_new,
        done=state.done | hit_stop | (num_new >= state.limit),
        hit_stop=state.hit_stop | hit_stop,
    )
    return state, count


@functools.partial(jax.jit, static_argnames=("model", "rule", "chunk_size", "max_new", "block"))
def start_speculative(
    model, params, tokens, lengths, limits, seeds, stop_ids, *, rule, chunk_size, max_new, block
) -> SpeculativeState:
    """`start_generation` (all loops, the last one's logits) with room in the cache for a verifier's
    block past the last new token, and the round counters at zero."""
    state = start_generation(
        model,
        params,
        tokens,
        lengths,
        limits,
        seeds,
        stop_ids,
        exit_policy=ExitPolicy.last(),
        rule=rule,
        chunk_size=chunk_size,
        max_new=max_new,
        extra_slots=block,
    )
    batch = tokens.shape[0]
    fields = {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}
    zeros = jnp.zeros((batch,), jnp.int32)
    return SpeculativeState(**fields, drafted=zeros, accepted=zeros, token_rounds=jnp.zeros_like(state.out))


@functools.partial(jax.jit, static_argnames=("model", "draft_loops", "block", "rule"), donate_argnames=("state",))
def speculate_until(
    model, params, state: SpeculativeState, until_step, *, draft_loops, block, rule
) -> SpeculativeState:
    """Rounds (see the module docstring) until state.step reaches until_step or every row is done."""
    draft_policy = ExitPolicy.at_loop(draft_loops - 1, skip_loops=True)

    def unfinished(state):
        return (state.step < until_step) & ~jnp.all(state.done)

    def draft_step(carry, _):
        cache, token = carry  # token [B] at position cache.end_index
        out = model.apply({"params": params}, token[:, None], cache=cache, exit_policy=draft_policy)
        token = _greedy(out.logits, rule)[:, 0]
        return (out.cache, token), (token, out.loops_computed)

    def one_round(state):
        start = state.cache.end_index  # [B]: the position of each row's last token
        (cache, _), (drafts, draft_loops_run) = jax.lax.scan(draft_step, (state.cache, state.last), None, length=block)
        drafts = drafts.T  # [B, k]
        block_tokens = jnp.concatenate([state.last[:, None], drafts], axis=1)  # [B, k + 1]
        verified = model.apply(
            {"params": params}, block_tokens, cache=cache.replace(end_index=start), exit_policy=ExitPolicy.last()
        )
        predicted = _greedy(verified.logits, rule)  # [B, k + 1]: y_i for position start + i + 1
        agreeing = jnp.sum(jnp.cumprod(drafts == predicted[:, :-1], axis=1), axis=1).astype(jnp.int32)  # [B]
        active = ~state.done
        state, count = _record_block(state, predicted, agreeing + 1)
        return state.replace(
            cache=verified.cache.replace(end_index=start + count),
            step=state.step + 1,
            loops=state.loops + jnp.sum(draft_loops_run) + verified.loops_computed,
            drafted=state.drafted + block * active,
            accepted=state.accepted + jnp.minimum(count, agreeing),
        )

    return jax.lax.while_loop(unfinished, one_round, state)


def _check_speculation(model, sampling: SamplingConfig, draft_loops, block) -> None:
    num_loops = model.config.num_loops
    if sampling.temperature != 0:
        raise GenerationError(f"speculative decoding is greedy only: temperature must be 0, got {sampling.temperature}")
    if num_loops < 2:
        raise GenerationError(f"speculative decoding drafts with fewer loops than the model's, which has {num_loops}")
    if isinstance(draft_loops, bool) or not isinstance(draft_loops, int) or not 1 <= draft_loops < num_loops:
        raise GenerationError(f"draft_loops must be an integer in [1, {num_loops - 1}], got {draft_loops!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise GenerationError(f"block (tokens drafted per round) must be a positive integer, got {block!r}")


class SpeculativeRun(GenerationRun):
    """A GenerationRun of `start_speculative` and `speculate_until`: its segments count rounds and
    its result is a SpeculativeResult."""

    def __init__(self, model, request, draft_loops: int, block: int, rule: TokenRule, segment_steps=None):
        start_static = dict(rule=rule, block=block)
        decode_static = dict(rule=rule, draft_loops=draft_loops, block=block)
        super().__init__(model, request, start_speculative, speculate_until, start_static, decode_static, segment_steps)
        self.block = block

    def result(self) -> SpeculativeResult:
        result = super().result()
        rows, block = self.request.rows, self.block
        drafted, accepted, token_rounds = jax.device_get(
            (self.state.drafted, self.state.accepted, self.state.token_rounds)
        )
        stats = SpeculativeStats(
            rounds=result.timing.decode_steps,
            row_rounds=int(drafted[:rows].sum()) // block,
            drafted=int(drafted[:rows].sum()),
            accepted=int(accepted[:rows].sum()),
        )
        rounds = [token_rounds[b, : len(tokens)].tolist() for b, tokens in enumerate(result.tokens)]
        return SpeculativeResult(**vars(result), stats=stats, token_rounds=rounds)


def speculative_run(
    model: nn.Module,
    params,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig = SamplingConfig(),
    *,
    draft_loops: int = 1,
    block: int = 4,
    chunk_size: int | None = None,
    buckets: Sequence[int] | None = DEFAULT_BUCKETS,
    batch_buckets: Sequence[int] | None = DEFAULT_BATCH_BUCKETS,
    segment_steps: int | None = None,
) -> SpeculativeRun:
    """Greedy self-speculative generation of up to sampling.max_new_tokens tokens after each prompt,
    prefilled, with its rounds still to run segment by segment (`segment_steps` rounds each) as the
    returned run is iterated (see GenerationRun). Each round drafts `block` tokens with the first
    `draft_loops` loops and verifies them with all loops (module docstring). chunk_size, buckets,
    batch_buckets as in `generation_run`. Compiled programs: one for the prefill, one for the rounds;
    both depend on (the buckets, draft_loops, block, vocab_limit). Raises GenerationError on bad input,
    a temperature above 0 included, before anything is compiled."""
    _check_speculation(model, sampling, draft_loops, block)
    request = prepare_request(
        model,
        params,
        prompts,
        sampling,
        exit_policy=ExitPolicy.last(),
        chunk_size=chunk_size,
        buckets=buckets,
        batch_buckets=batch_buckets,
        seeds=None,
        segment_steps=segment_steps,
    )
    return SpeculativeRun(model, request, draft_loops, block, sampling.token_rule, segment_steps)


def generate_speculative(
    model: nn.Module, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(), **options
) -> SpeculativeResult:
    """`speculative_run`'s request (same options) run to the end."""
    return speculative_run(model, params, prompts, sampling, **options).result()
