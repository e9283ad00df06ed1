"""Text in, text out: the one owner of what generation does with text, for melt-generate and the
lm-eval adapter.

    generator = TextGenerator.load(checkpoint, "byte", sampling=SamplingConfig(max_new_tokens=32),
                                   stops=("\\n",))
    generator.generate(["3*4="]).texts   # per prompt, the new text cut at the first stop string
    run = generator.start(["3*4="])
    for pieces in run:                   # per segment, each prompt's new text safe to print
        print(pieces[0], end="")
    run.result().generation.timing

A TextGenerator holds the model, its tokenizer and the text settings: stop strings (a row stops at
the tokenizer's eos token, at any stop string, and with `chat` at `<|im_end|>`), the ChatML template
of the Ouro Thinking models (`chat`), the sampling settings (their stop token ids and vocabulary limit
are filled in from the tokenizer), the exit policy, the prefill chunk and, optionally, greedy
self-speculative decoding (melt_jax/inference/speculative.py). Stop strings that are one token are
stop tokens of the compiled loop; longer ones are checked on the decoded text between segments of
`segment_steps` decode steps, and the text is cut at the first one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn

from melt_jax.data.tokenizer import Tokenizer
from melt_jax.errors import DataError, GenerationError
from melt_jax.inference.batching import DEFAULT_BATCH_BUCKETS
from melt_jax.inference.generation import GenerationResult, GenerationRun, generation_run
from melt_jax.inference.model_loading import checkpoint_tokenizer, load_model
from melt_jax.inference.sampling import SamplingConfig
from melt_jax.inference.speculative import speculative_run
from melt_jax.model.exit import ExitPolicy

CHAT_END = "<|im_end|>"


def chat_prompt(text: str) -> str:
    """`text` as one user turn of the ChatML template, followed by the assistant's turn opening."""
    return f"<|im_start|>user\n{text}{CHAT_END}\n<|im_start|>assistant\n"


def cut_at_stops(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return (text[: min(positions)], True) if positions else (text, False)


def stop_token_ids(tokenizer: Tokenizer, stops: Sequence[str], chat: bool = False) -> tuple[int, ...]:
    """The tokens that end a row: the tokenizer's eos id, every stop string that is one token (longer
    ones are checked on the text), and `<|im_end|>` with `chat` (GenerationError for a tokenizer
    without it)."""
    ids = {tokenizer.eos_id}
    for stop in stops:
        encoded = tokenizer.encode(stop)
        if len(encoded) == 1:
            ids.add(encoded[0])
    if chat:
        try:
            ids.add(tokenizer.token_to_id(CHAT_END))
        except DataError:
            raise GenerationError(f"--chat needs a tokenizer with the {CHAT_END} token") from None
    return tuple(sorted(ids))


class TextStream:
    """Turns the growing decoded text of one row into pieces safe to print: nothing that a later token
    may still change (a partial UTF-8 character at the end) or that may be the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) - 1 for s in self.stops), default=0)
        self.printed = 0

    def update(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(new text to print, whether a stop string was reached) for the decoded text so far."""
        text, stopped = cut_at_stops(text, self.stops)
        if not (final or stopped):
            text = text.rstrip("\ufffd")
            text = text[: max(len(text) - self.hold, self.printed)]
        piece, self.printed = text[self.printed :], max(len(text), self.printed)
        return piece, stopped


@dataclasses.dataclass(frozen=True)
class TextResult:
    texts: list[str]  # per prompt: the new text, cut at the first stop string
    generation: GenerationResult  # the tokens, why each row ended, the timing


@dataclasses.dataclass(frozen=True, eq=False)  # params are arrays: compared by identity
class TextGenerator:
    """A model and its tokenizer with the text settings of generation (see the module docstring).

    sampling: temperature, top_k, top_p, max_new_tokens, seed; its stop_token_ids are joined by the
    tokenizer's (see `sampling_config`). speculative: (draft loops, block) for greedy self-speculative
    decoding, which takes no seeds and verifies with every loop (no exit policy). segment_steps: decode
    steps between two looks at the text (stop strings, streaming)."""

    model: nn.Module
    params: Any
    tokenizer: Tokenizer
    sampling: SamplingConfig = SamplingConfig()
    stops: tuple[str, ...] = ()
    chat: bool = False
    exit_policy: ExitPolicy = ExitPolicy()
    prefill_chunk: int | None = None
    speculative: tuple[int, int] | None = None
    segment_steps: int = 16

    @classmethod
    def load(
        cls,
        checkpoint,
        tokenizer: str | None = None,
        dtype: str | None = None,
        int8: bool = False,
        attention: str | None = None,
        **settings,
    ):
        """A generator over a melt_jax checkpoint directory (melt_jax.inference.model_loading.load_model,
        which takes dtype, int8 and attention) and a tokenizer ('byte', or a tokenizer.json or its
        folder; None: the one the checkpoint carries); `settings` are the other fields."""
        tokenizer = checkpoint_tokenizer(checkpoint, tokenizer)
        model, params = load_model(checkpoint, dtype, int8=int8, attention=attention)
        return cls(model, params, tokenizer, **settings)

    @property
    def all_stops(self) -> list[str]:
        """The stop strings, with `<|im_end|>` in chat mode."""
        return list(self.stops) + ([CHAT_END] if self.chat else [])

    def encode(self, text: str) -> list[int]:
        """The token ids of a prompt, wrapped in the chat template in chat mode."""
        return self.tokenizer.encode(chat_prompt(text) if self.chat else text)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids, special tokens included."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def sampling_config(self) -> SamplingConfig:
        """`sampling` with the stop tokens of the text settings added (`stop_token_ids`) and, for a
        tokenizer smaller than the model's (padded) vocabulary, a vocab_limit at the tokenizer's size."""
        size = self.tokenizer.vocab_size
        vocab_limit = size if size < self.model.config.vocab_size else None
        stop_ids = set(self.sampling.stop_token_ids) | set(stop_token_ids(self.tokenizer, self.all_stops, self.chat))
        return dataclasses.replace(self.sampling, stop_token_ids=tuple(sorted(stop_ids)), vocab_limit=vocab_limit)

    def start(
        self,
        prompts: Sequence[str | Sequence[int]],
        *,
        stream: bool = False,
        seeds: Sequence[int] | None = None,
        batch_buckets: Sequence[int] | None = DEFAULT_BATCH_BUCKETS,
    ) -> TextRun:
        """Prefills a batch of prompts (texts, encoded with `encode`, or token ids) and returns the run
        to iterate. With `stream` (or stop strings to check) the decode loop runs in segments of
        segment_steps; seeds: one per prompt (None: sampling.seed), as in `generate`."""
        ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        sampling = self.sampling_config()
        watch = stream or bool(self.all_stops)
        segment_steps = self.segment_steps if watch else None
        if self.speculative is None:
            run = generation_run(
                self.model,
                self.params,
                ids,
                sampling,
                exit_policy=self.exit_policy,
                chunk_size=self.prefill_chunk,
                batch_buckets=batch_buckets,
                seeds=seeds,
                segment_steps=segment_steps,
            )
        else:
            if seeds is not None:
                raise GenerationError("speculative decoding is greedy: it takes no seeds")
            draft_loops, block = self.speculative
            run = speculative_run(
                self.model,
                self.params,
                ids,
                sampling,
                draft_loops=draft_loops,
                block=block,
                chunk_size=self.prefill_chunk,
                batch_buckets=batch_buckets,
                segment_steps=segment_steps,
            )
        return TextRun(self, run, watch)

    def generate(self, prompts: Sequence[str | Sequence[int]], **options) -> TextResult:
        """The new text of every prompt, cut at the first stop string; options as in `start`."""
        return self.start(prompts, **options).result()


class TextRun:
    """A batch of prompts being generated. Iterating it yields, after the prefill and after every
    segment, one piece of new text per prompt, safe to print (see TextStream), and a last one when
    generation has ended; rows that reach a stop string are finished at once. `result()` then (or
    instead) gives the whole texts."""

    def __init__(self, generator: TextGenerator, run: GenerationRun, watch: bool):
        self.generator, self.run, self.watch = generator, run, watch
        self.streams = [TextStream(generator.all_stops) for _ in range(run.request.rows)]
        self._result: TextResult | None = None

    def _pieces(self, rows: list[list[int]], final: bool) -> tuple[list[str], list[bool]]:
        updates = [stream.update(self.generator.decode(row), final) for stream, row in zip(self.streams, rows)]
        return [piece for piece, _ in updates], [stopped for _, stopped in updates]

    def __iter__(self) -> Iterator[list[str]]:
        if self._result is not None:
            return
        if self.watch:
            for rows in self.run:
                pieces, stopped = self._pieces(rows, final=False)
                self.run.finish(stopped)
                yield pieces
        generation = self.run.result()
        stops = self.generator.all_stops
        texts = [cut_at_stops(self.generator.decode(row), stops)[0] for row in generation.tokens]
        self._result = TextResult(texts=texts, generation=generation)
        yield self._pieces(generation.tokens, final=True)[0]

    def result(self) -> TextResult:
        """Runs what is left; the texts and the token-level result."""
        for _ in self:
            pass
        return self._result
