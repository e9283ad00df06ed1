"""lm-evaluation-harness model `melt_jax`: standard benchmarks on Ouro and MELT checkpoints.

    pip install "melt-jax[eval]"          # lm-eval==0.4.13
    melt-lm-eval run --model melt_jax --model_args checkpoint=CKPT,tokenizer=PATH/tokenizer.json \
        --tasks hellaswag --batch_size 8
    # or in Python, after `import melt_jax.inference.lm_eval_adapter` (which registers the name):
    lm_eval.simple_evaluate(model="melt_jax", model_args="checkpoint=CKPT,tokenizer=byte", tasks=[...])

`melt-lm-eval` is lm-eval's own command line with this model registered. Model arguments:
checkpoint (a melt_jax checkpoint directory, Ouro or MELT), tokenizer ('byte' or a tokenizer.json or
its folder), batch_size (default 8), exit (last | loop:N | threshold:X | weighted | default, see
melt_jax.model.exit.ExitPolicy.parse), max_length (default the config's max_position_embeddings), max_gen_toks
(default 256), chunk_size (MELT's scoring chunk, default config.chunk_size), prefill_chunk (MELT's
prefill chunk when generating), dtype (float32 | bfloat16 | float16, default as saved), int8 (true |
false, default false: int8 matmul weights with per-channel scales, melt_jax.inference.quantization).

- loglikelihood: context and continuation are encoded together and split at the context's tokens
  (so that a BPE merge across the boundary is scored as one continuation token); context + continuation
  are left-truncated to max_length + 1 tokens and the continuation's tokens are scored with one
  teacher-forced forward (`evaluation.token_log_probs`; MELT: chunked like inference).
- loglikelihood_rolling: disjoint windows of max_length predictions (lm-eval's window helpers), the
  first conditioned on the eos token.
- generate_until: `text_generation.TextGenerator` with the eos token and single-token stop strings as
  stop tokens, other stop strings checked between decode segments, the text cut at the first stop
  string.
  Each request draws with its own seed (the generation arguments' `seed`, default 0), so its text does
  not depend on the batch it lands in; the k-th copy of an identical request (lm-eval's `repeats`)
  draws with seed + k, so that repeated samples differ.
Batches are padded to `batch_size` rows and sequence lengths to sampling's buckets, so the number of
compiled programs stays small.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from melt_jax.data.tokenizer import Tokenizer
from melt_jax.errors import GenerationError, MeltJaxError, exit_status
from melt_jax.inference.batching import DEFAULT_BUCKETS, bucket_length
from melt_jax.inference.evaluation import token_log_probs
from melt_jax.inference.param_check import check_params
from melt_jax.inference.sampling import SamplingConfig
from melt_jax.inference.text_generation import TextGenerator
from melt_jax.model.exit import ExitPolicy

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the lm-eval adapter needs lm-eval: pip install 'melt-jax[eval]' (lm-eval==0.4.13)") from e

logger = logging.getLogger(__name__)

MODEL_NAME = "melt_jax"
STOP_CHECK_STEPS = 16  # decode steps between checks for stop strings


@functools.partial(jax.jit, static_argnames=("model", "exit_policy", "chunk_size"))
def _score(model, params, tokens, score_mask, exit_policy, chunk_size):
    """Per row of tokens [B, S]: the summed log-probability of the predicted tokens where
    score_mask [B, S] is set, and whether each of them is the argmax. Returns ([B], bool [B])."""
    log_probs, greedy = token_log_probs(model, params, tokens, exit_policy, chunk_size)  # [B, S-1]
    mask = score_mask[:, 1:]
    return jnp.sum(jnp.where(mask, log_probs, 0.0), axis=1), jnp.all(greedy | ~mask, axis=1)


def _wrap_int32(value: int) -> int:
    """value wrapped into the 32-bit range of a seed."""
    return (value + 2**31) % 2**32 - 2**31


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or isinstance(value, bool):
        raise GenerationError(f"model argument {name} must be a positive integer, got {value!r}")
    return number


def _boolean(name: str, value: Any) -> bool:
    """A model argument that is true or false (lm-eval passes 'true' / 'false' as booleans or strings)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise GenerationError(f"model argument {name} must be true or false, got {value!r}")


@register_model(MODEL_NAME)
class MeltJaxLM(LM):
    """lm-eval's LM interface over a melt_jax Ouro or MELT model (see the module docstring)."""

    def __init__(
        self,
        checkpoint: str,
        tokenizer: str = "byte",
        batch_size: int | str = 8,
        exit: str = "last",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        chunk_size: int | None = None,
        prefill_chunk: int | None = None,
        dtype: str | None = None,
        int8: bool | str = False,
        max_batch_size: int | None = None,  # given by lm-eval; batches have a fixed size here
        device: str | None = None,  # given by lm-eval; JAX places arrays on its default device
    ):
        loaded = TextGenerator.load(checkpoint, tokenizer, dtype, int8=_boolean("int8", int8))
        options = dict(
            batch_size=batch_size,
            exit_policy=ExitPolicy.parse(str(exit), loaded.model.config),
            max_length=max_length,
            max_gen_toks=max_gen_toks,
            chunk_size=chunk_size,
            prefill_chunk=prefill_chunk,
        )
        self._setup(loaded.model, loaded.params, loaded.tokenizer, **options)

    @classmethod
    def from_model(cls, model, params, tokenizer: Tokenizer, **options) -> MeltJaxLM:
        """An adapter over a model already in memory; options as the keyword arguments of `_setup`."""
        lm = cls.__new__(cls)
        lm._setup(model, jax.device_put(params), tokenizer, **options)
        return lm

    def _setup(
        self,
        model,
        params,
        tokenizer: Tokenizer,
        *,
        batch_size: int | str = 8,
        exit_policy: ExitPolicy = ExitPolicy(),
        max_length: int | None = None,
        max_gen_toks: int = 256,
        chunk_size: int | None = None,
        prefill_chunk: int | None = None,
    ) -> None:
        LM.__init__(self)
        check_params(model, params)
        config = model.config
        if tokenizer.vocab_size > config.vocab_size:
            raise GenerationError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is {config.vocab_size}"
            )
        self.model, self.params, self.tokenizer = model, params, tokenizer
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = 8
        self.batch_size = _positive_int("batch_size", batch_size)
        self.exit_policy = exit_policy
        self._max_length = _positive_int("max_length", max_length or config.max_position_embeddings)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.chunk_size = None if chunk_size is None else _positive_int("chunk_size", chunk_size)
        self.prefill_chunk = None if prefill_chunk is None else _positive_int("prefill_chunk", prefill_chunk)
        self.generator = TextGenerator(
            model,
            params,
            tokenizer,
            exit_policy=exit_policy,
            prefill_chunk=self.prefill_chunk,
            segment_steps=STOP_CHECK_STEPS,
        )

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    # ----------------------------------------------------------------------------------------------
    # Scoring

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), encoded together and split after the context's ids; the
        context's trailing spaces move to the continuation. An empty context becomes the eos token."""
        stripped = context.rstrip(" ")
        continuation = context[len(stripped) :] + continuation
        if not stripped:
            return [self.eot_token_id], self.tokenizer.encode(continuation)
        context_ids = self.tokenizer.encode(stripped)
        whole = self.tokenizer.encode(stripped + continuation)
        if whole[: len(context_ids)] != context_ids:  # the boundary merged: encode separately
            return context_ids, self.tokenizer.encode(continuation)
        return context_ids, whole[len(context_ids) :]

    def _score_pairs(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is greedy) for each (context ids,
        continuation ids), in the order given; longest first in batches of batch_size."""
        rows = []
        for context, continuation in pairs:
            whole = (context + continuation)[-(self.max_length + 1) :]
            rows.append((whole, min(len(continuation), len(whole) - 1)))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = bucket_length(len(rows[batch[0]][0]), DEFAULT_BUCKETS)
            tokens = np.zeros((self.batch_size, width), np.int32)  # [B, S]
            score_mask = np.zeros((self.batch_size, width), bool)  # [B, S]
            for b, i in enumerate(batch):
                whole, scored = rows[i]
                tokens[b, : len(whole)] = whole
                score_mask[b, len(whole) - scored : len(whole)] = True
            sums, greedy = _score(self.model, self.params, tokens, score_mask, self.exit_policy, self.chunk_size)
            sums, greedy = jax.device_get((sums, greedy))
            for b, i in enumerate(batch):
                results[i] = (float(sums[b]), bool(greedy[b]))
        return results

    def _check_ids(self, ids: Sequence[int], what: str) -> None:
        bad = [i for i in ids if not 0 <= i < self.model.config.vocab_size]
        if bad:
            raise GenerationError(f"{what} encodes to ids {bad[:5]} outside the model's vocabulary")

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args) for request in requests]
        for context, continuation in pairs:
            self._check_ids(context + continuation, "a request")
        results = self._score_pairs(pairs)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        windows, owners = [], []
        for index, request in enumerate(requests):
            ids = self.tokenizer.encode(request.args[0])
            self._check_ids(ids, "a request")
            for window in get_rolling_token_windows(ids, self.eot_token_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._score_pairs(windows)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ----------------------------------------------------------------------------------------------
    # Generation

    def _sampling(self, gen_kwargs: dict) -> tuple[SamplingConfig, list[str]]:
        """The sampling settings and stop strings of one request's generation arguments (normalised
        by lm-eval: do_sample False means greedy whatever the temperature)."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=self.max_gen_toks))
        until = [text for text in kwargs.pop("until") if text]
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        if eos_text not in until:
            until.append(eos_text)
        do_sample, temperature = kwargs.pop("do_sample"), float(kwargs.pop("temperature", 0.0))
        top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
        sampling = SamplingConfig(
            temperature=temperature if do_sample else 0.0,
            top_k=None if top_k is None else int(top_k),
            top_p=None if top_p is None else float(top_p),
            max_new_tokens=_positive_int("max_gen_toks", kwargs.pop("max_gen_toks")),
            seed=int(kwargs.pop("seed", 0)),
        )
        if kwargs:
            logger.warning("melt_jax ignores the generation arguments %s", sorted(kwargs))
        return dataclasses.replace(self.generator, sampling=sampling, stops=tuple(until)).sampling_config(), until

    def _prompt_ids(self, context: str, max_new_tokens: int) -> list[int]:
        room = min(self.max_length, self.model.config.max_position_embeddings) - max_new_tokens
        if room < 1:
            raise GenerationError(
                f"max_gen_toks {max_new_tokens} leaves no room for a prompt in max_length {self.max_length}"
            )
        ids = self.tokenizer.encode(context) or [self.eot_token_id]
        self._check_ids(ids, "a context")
        return ids[-room:]

    def generate_until(self, requests) -> list[str]:
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        outputs: list[str] = [""] * len(requests)
        for indices in groups.values():
            sampling, until = self._sampling(requests[indices[0]].args[1])
            generator = dataclasses.replace(self.generator, sampling=sampling, stops=tuple(until))
            copies: dict[str, int] = {}  # context -> copies seen so far in this group
            seeds = []
            for i in indices:
                context = requests[i].args[0]
                seeds.append(_wrap_int32(sampling.seed + copies.get(context, 0)))
                copies[context] = copies.get(context, 0) + 1
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                prompts = [self._prompt_ids(requests[i].args[0], sampling.max_new_tokens) for i in batch]
                result = generator.generate(
                    prompts, seeds=seeds[start : start + self.batch_size], batch_buckets=(self.batch_size,)
                )
                for i, text in zip(batch, result.texts):
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        return outputs


def main() -> int:
    """`melt-lm-eval`: lm-eval's command line with the `melt_jax` model registered; melt_jax's errors
    (a bad checkpoint, tokenizer or setting) end it as every melt_jax command line does
    (`melt-lm-eval: error: ...`, exit status 2 for bad input, 1 for a failure at run time)."""
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except (MeltJaxError, OSError) as e:
        return exit_status("melt-lm-eval", e)
    return 0
