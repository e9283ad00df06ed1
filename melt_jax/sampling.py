"""jit-compiled generation for Ouro and MELT over a fixed-size KV cache.

    result = generate(model, params, [[12, 7, 99], [5]], SamplingConfig(max_new_tokens=32))
    result.tokens        # per prompt, the new tokens (without the prompt or the stop token)
    result.stop_reasons  # per prompt: 'stop_token', 'length' or 'stopped' (asked by `on_segment`)

How a batch of prompts of different lengths is run:
1. Host: validate everything (`GenerationError`), right-pad the prompts with id 0 to a bucket length P
   (the smallest of `buckets` that fits the longest prompt), so that the compiled programs depend on
   (B, P, max_new_tokens) only.
2. `_start` (one jit): prefill all P positions into an empty cache of P + max_new_tokens slots, in
   chunks of `chunk_size` starting at position 0 (MELT: default config.chunk_size; Ouro: the
   whole prompt at once, any chunking gives the same values); keep the hidden state at each row's last
   real position, set the cache's end_index to the true lengths, and sample the first new token.
   This is exact: a real token at position p only attends to slots <= p, which hold real tokens, and
   for MELT the chunk boundaries are the ones the prompt alone would have. Pad slots at positions
   >= length are never visible to real tokens and are overwritten by the decoded ones.
3. `_decode` (one jit): a `lax.while_loop` of one-token decode steps (MELT: chunk size 1), each row
   fed its last token at its own position, with per-row done flags (a stop token, or max_new_tokens
   reached), writing into a fixed [B, max_new_tokens] buffer. Finished rows keep running (fixed
   shapes) but record nothing. With `segment_steps` the same loop is run segment by segment and
   `on_segment` sees the tokens after each one: that is how the command line streams.

Random draws: row b at new-token index i draws with fold_in(fold_in(key(seed), b), i), so a seed
reproduces a batch exactly; greedy decoding does not depend on the batch at all.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from melt_jax import param_table
from melt_jax.cache import KVCache
from melt_jax.checkpoint import load_params
from melt_jax.chunking import check_chunk_size, scan_chunks
from melt_jax.config import OuroConfig
from melt_jax.errors import ConfigError, GenerationError
from melt_jax.exit import ExitPolicy, select_hidden
from melt_jax.ouro import OuroModel
from melt_jax.params import abstract_params
from melt_jax.registry import model_for

Array = jax.Array

DEFAULT_BUCKETS = tuple(2**i for i in range(4, 17))  # 16 .. 65536
STOP_SLOTS = 8  # stop-token lists are padded to a multiple of this
PAD_ID = 0  # prompt padding (any id works: pad positions are never seen by real tokens)

STOP_TOKEN, LENGTH, STOPPED = "stop_token", "length", "stopped"


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen and when generation ends.

    temperature     0 = greedy (argmax); else sample from softmax(logits / temperature)
    top_k           keep only the k largest logits (None or 0: all)
    top_p           keep the smallest set of most likely tokens whose probability reaches top_p
                    (None or 1.0: all); applied after top_k
    max_new_tokens  most new tokens per prompt, the stop token included
    stop_token_ids  a row ends when it produces one of these (the stop token is not returned)
    seed            seed of the random draws
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


@dataclasses.dataclass(frozen=True)
class GenerationTiming:
    """Wall-clock seconds of one `generate` call; compile times are separate from run times.

    decode_tokens counts the tokens produced by decode steps (every row's new tokens after the first,
    which comes from the prefill)."""

    compile_s: float
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    decode_tokens: int

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    tokens: list[list[int]]  # per prompt: new tokens, without the prompt and the stop token
    stop_reasons: list[str]  # per prompt: STOP_TOKEN, LENGTH or STOPPED
    timing: GenerationTiming


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
    """The keys [B] of new-token `index` from the per-row keys [B]."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, index)


# --------------------------------------------------------------------------------------------------
# The compiled programs


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries.

    cache: the KV cache (end_index [B] = each row's next position); last: [B] the last new token;
    out: [B, N] new tokens (N = max_new_tokens), valid up to num_new; num_new: [B] tokens recorded;
    done: [B]; hit_stop: [B] ended on a stop token; step: [] new tokens drawn so far (all rows);
    row_keys: [B] random keys; stop_ids: [n] stop token ids, padded with -1.
    """

    cache: KVCache
    last: Array
    out: Array
    num_new: Array
    done: Array
    hit_stop: Array
    step: Array
    row_keys: Array
    stop_ids: Array


def _prefill_last_hidden(model: nn.Module, params, tokens: Array, lengths: Array, cache: KVCache, chunk_size: int):
    """Runs tokens [B, P] into the cache chunk after chunk (chunks of `chunk_size` from position 0,
    the last one possibly shorter). Returns (hidden [T, B, H] and exit_pdf [B, T] at each row's
    position lengths - 1, cache)."""
    last = lengths - 1  # [B]

    def run_chunk(carry, chunk, start):  # chunk [B, C] at positions start..start+C-1
        cache, hidden, pdf = carry
        out = model.apply({"params": params}, chunk, cache=cache, exit_policy=None)
        offset = jnp.clip(last - start, 0, chunk.shape[1] - 1)  # [B]
        here = (last >= start) & (last < start + chunk.shape[1])  # [B]
        new_hidden = jnp.take_along_axis(out.hidden_steps, offset[None, :, None, None], axis=2)[:, :, 0]  # [T, B, H]
        new_pdf = jnp.take_along_axis(out.exit_pdf, offset[:, None, None], axis=1)[:, 0]  # [B, T]
        hidden = jnp.where(here[None, :, None], new_hidden, hidden)
        pdf = jnp.where(here[:, None], new_pdf, pdf)
        return (out.cache, hidden, pdf), None

    c = model.config
    hidden = jnp.zeros((c.num_loops, tokens.shape[0], c.hidden_size), c.jnp_dtype)
    pdf = jnp.zeros((tokens.shape[0], c.num_loops), c.jnp_dtype)
    (cache, hidden, pdf), _ = scan_chunks(run_chunk, (cache, hidden, pdf), tokens, chunk_size)
    return hidden, pdf, cache


def _record(state: DecodeState, token: Array, max_new: int) -> DecodeState:
    """Adds token [B] as new token number state.step of the rows that are not done."""
    active = ~state.done
    out = state.out.at[:, state.step].set(jnp.where(active, token, -1))
    is_stop = jnp.any(token[:, None] == state.stop_ids[None, :], axis=-1) & active
    num_new = state.num_new + active
    done = state.done | is_stop | (num_new >= max_new)
    return state.replace(
        last=token, out=out, num_new=num_new, done=done, hit_stop=state.hit_stop | is_stop, step=state.step + 1
    )


@functools.partial(jax.jit, static_argnames=("model", "exit_policy", "rule", "chunk_size", "max_new"))
def _start(model, params, tokens, lengths, seed, stop_ids, *, exit_policy, rule, chunk_size, max_new) -> DecodeState:
    """Prefill of tokens [B, P] (true lengths [B]) and the first new token; see the module docstring."""
    batch, seq = tokens.shape
    cache = model.init_cache(batch, seq + max_new)
    hidden, pdf, cache = _prefill_last_hidden(model, params, tokens, lengths, cache, chunk_size)
    chosen, _ = select_hidden(hidden[:, :, None], pdf[:, None], exit_policy)  # [B, 1, H]
    logits = model.apply({"params": params}, chosen[:, 0], method="logits")  # [B, V]
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.arange(batch))
    state = DecodeState(
        cache=cache.replace(end_index=lengths),
        last=jnp.zeros((batch,), jnp.int32),
        out=jnp.full((batch, max_new), -1, jnp.int32),
        num_new=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
        hit_stop=jnp.zeros((batch,), bool),
        step=jnp.zeros((), jnp.int32),
        row_keys=row_keys,
        stop_ids=stop_ids,
    )
    return _record(state, next_tokens(logits, draw_keys(row_keys, 0), rule), max_new)


@functools.partial(jax.jit, static_argnames=("model", "exit_policy", "rule"), donate_argnames=("state",))
def _decode(model, params, state: DecodeState, until_step, *, exit_policy, rule) -> DecodeState:
    """Decode steps until state.step reaches until_step or every row is done."""
    max_new = state.out.shape[1]

    def unfinished(state):
        return (state.step < until_step) & ~jnp.all(state.done)

    def step(state):
        out = model.apply({"params": params}, state.last[:, None], cache=state.cache, exit_policy=exit_policy)
        token = next_tokens(out.logits[:, 0], draw_keys(state.row_keys, state.step), rule)
        return _record(state.replace(cache=out.cache), token, max_new)

    return jax.lax.while_loop(unfinished, step, state)


# --------------------------------------------------------------------------------------------------
# Text-level settings shared by the command line and the lm-eval adapter


def cut_at_stops(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return (text[: min(positions)], True) if positions else (text, False)


def stop_ids_for(tokenizer, stops: Sequence[str]) -> set[int]:
    """The token ids that end generation for a tokenizer (melt_jax.tokenizer.Tokenizer) and stop
    strings: its eos id and every stop string that is a single token (longer ones are checked on the
    text, see `cut_at_stops`)."""
    ids = {tokenizer.eos_id}
    for stop in stops:
        encoded = tokenizer.encode(stop)
        if len(encoded) == 1:
            ids.add(encoded[0])
    return ids


def vocab_limit_for(tokenizer, config: OuroConfig) -> int | None:
    """SamplingConfig.vocab_limit for a tokenizer smaller than the model's (padded) vocabulary."""
    return tokenizer.vocab_size if tokenizer.vocab_size < config.vocab_size else None


# --------------------------------------------------------------------------------------------------
# Host side: validation and the loop over segments


def load_model(path, dtype: str | None = None) -> tuple[OuroModel, dict]:
    """(model, params on the default device) of a melt_jax checkpoint directory, Ouro or MELT.
    CheckpointError / ConfigError name what is wrong with the directory."""
    config, params = load_params(path, dtype)
    return model_for(config), jax.device_put(params)


def parse_exit_policy(text: str, config: OuroConfig) -> ExitPolicy:
    """An exit policy from its command-line form: 'last', 'step:N' (0-based loop), 'threshold:X',
    'weighted', or 'default' (what upstream Ouro returns: config.early_exit_step / _threshold)."""
    name, _, value = text.partition(":")
    try:
        if name in ("last", "weighted") and not value:
            policy = ExitPolicy(name)
        elif name == "default" and not value:
            policy = ExitPolicy.upstream_default(config)
        elif name == "step" and value:
            policy = ExitPolicy.at_step(int(value))
        elif name == "threshold" and value:
            policy = ExitPolicy.at_threshold(float(value))
        else:
            raise ValueError("unknown form")
        policy.validate(config.num_loops)
    except ValueError as e:
        raise GenerationError(
            f"bad exit policy {text!r} ({e}); expected last, step:N (0 <= N < {config.num_loops}), "
            "threshold:X, weighted or default"
        ) from None
    return policy


@functools.lru_cache(maxsize=8)
def _expected_leaves(model: nn.Module) -> dict[str, tuple[int, ...]]:
    tree = jax.tree_util.tree_flatten_with_path(abstract_params(model))[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in tree}


def check_params(model: nn.Module, params) -> None:
    """GenerationError unless params has exactly the tree and shapes `model` expects (a MELT checkpoint
    with an Ouro model or the reverse, or a config that does not match the weights)."""
    if not isinstance(getattr(model, "config", None), OuroConfig):
        raise GenerationError(f"expected a melt_jax model (OuroModel, MeltModel), got {type(model).__name__}")
    kind = model.config.model_type
    expected = _expected_leaves(model)
    try:
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        got = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in leaves}
    except Exception as e:  # not a pytree of arrays
        raise GenerationError(f"params are not a tree of arrays: {e}") from None
    params_kind = param_table.model_type_of_params(param_table.path_of(p) for p, _ in leaves)
    if params_kind != kind:
        melt = params_kind == "melt"
        found = "a MELT checkpoint (it has kv_gate weights)" if melt else "an Ouro checkpoint (no kv_gate weights)"
        raise GenerationError(f"the model is {kind!r} but the params are {found}; load it with the matching model")
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise GenerationError(f"params do not match the {kind} model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in expected.items():
        if got[name] != shape:
            raise GenerationError(f"params{name} has shape {got[name]}, the model's config expects {shape}")


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


def _pad_prompts(prompts: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [B, length] right-padded with PAD_ID, lengths int32 [B])."""
    tokens = np.full((len(prompts), length), PAD_ID, np.int32)
    for b, prompt in enumerate(prompts):
        tokens[b, : len(prompt)] = prompt
    return tokens, np.array([len(p) for p in prompts], np.int32)


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


def _tokens_so_far(state: DecodeState) -> list[list[int]]:
    out, num_new = jax.device_get((state.out, state.num_new))
    return [out[b, : num_new[b]].tolist() for b in range(out.shape[0])]


def _decode_in_segments(
    decode, params, state: DecodeState, segment_steps: int | None, on_segment
) -> tuple[DecodeState, float]:
    """Runs the compiled decode loop to the end, in segments of `segment_steps` with `on_segment`
    called before each (see `generate`). Returns (final state, seconds spent decoding)."""
    batch, max_new = state.out.shape
    seconds = 0.0
    while True:
        if on_segment is not None:
            stop_rows = on_segment(_tokens_so_far(state))
            if stop_rows is not None:
                stop_rows = np.asarray(stop_rows, bool)
                if stop_rows.shape != (batch,):
                    raise GenerationError(f"on_segment returned {stop_rows.size} flags for {batch} rows")
                state = state.replace(done=state.done | stop_rows)
        step, all_done = jax.device_get((state.step, jnp.all(state.done)))
        if step >= max_new or all_done:
            return state, seconds
        until = max_new if segment_steps is None else min(int(step) + segment_steps, max_new)
        state, segment_s = _timed(decode, params, state, np.int32(until))
        seconds += segment_s


def _outputs(state: DecodeState) -> tuple[list[list[int]], list[str]]:
    """Per row: the new tokens without the stop token, and why the row ended."""
    rows, hit_stop = _tokens_so_far(state), jax.device_get(state.hit_stop)
    max_new = state.out.shape[1]
    tokens, reasons = [], []
    for row, stopped in zip(rows, hit_stop):
        tokens.append(row[:-1] if stopped else row)
        reasons.append(STOP_TOKEN if stopped else LENGTH if len(row) >= max_new else STOPPED)
    return tokens, reasons


def generate(
    model: nn.Module,
    params,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig = SamplingConfig(),
    *,
    exit_policy: ExitPolicy = ExitPolicy(),
    chunk_size: int | None = None,
    buckets: Sequence[int] | None = DEFAULT_BUCKETS,
    segment_steps: int | None = None,
    on_segment: Callable[[list[list[int]]], Sequence[bool] | None] | None = None,
) -> GenerationResult:
    """Generates up to sampling.max_new_tokens tokens after each prompt (lists of token ids).

    exit_policy         which loop's logits choose the tokens (Ouro and MELT run all loops)
    chunk_size          chunk of the prompt prefill (default config.default_chunk_size: MELT's
                        chunk_size, 1 = exactly token-by-token decoding; Ouro: the whole prompt, its
                        values do not depend on it)
    buckets             prompt lengths are padded up to one of these to bound recompiles
                        (None: no padding)
    segment_steps       run the decode loop this many steps at a time, calling on_segment(tokens per
                        row so far, stop tokens included) after the prefill and after every segment;
                        on_segment may return a list of bools, the rows to finish now (e.g. on a stop
                        string). Without segment_steps the loop runs to the end in one call.
    Raises GenerationError on bad input before anything is compiled.
    """
    check_params(model, params)
    prompts = check_prompts(prompts, model.config.vocab_size)
    longest = max(len(p) for p in prompts)
    chunk_size = _check_setup(model, sampling, exit_policy, chunk_size, segment_steps, longest)

    max_new = sampling.max_new_tokens
    padded = min(bucket_length(longest, buckets), max(longest, model.config.max_position_embeddings - max_new))
    tokens, lengths = _pad_prompts(prompts, padded)
    params = jax.tree.map(jnp.asarray, params)
    static = dict(exit_policy=exit_policy, rule=sampling.token_rule)
    start_args = (params, tokens, lengths, np.int32(sampling.seed), _pad_stop_ids(sampling.stop_token_ids))
    chunk = padded if chunk_size is None else min(chunk_size, padded)

    start, start_compile_s = _compiled(_start, model, *start_args, **static, chunk_size=chunk, max_new=max_new)
    state, prefill_s = _timed(start, *start_args)
    decode, decode_compile_s = _compiled(_decode, model, params, state, np.int32(0), **static)
    state, decode_s = _decode_in_segments(decode, params, state, segment_steps, on_segment)
    results, reasons = _outputs(state)
    timing = GenerationTiming(
        compile_s=start_compile_s + decode_compile_s,
        prefill_s=prefill_s,
        decode_s=decode_s,
        prompt_tokens=int(lengths.sum()),
        decode_tokens=int(np.maximum(jax.device_get(state.num_new) - 1, 0).sum()),
    )
    return GenerationResult(tokens=results, stop_reasons=reasons, timing=timing)
