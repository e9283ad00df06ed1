"""Text-level generation settings shared by the command line and the lm-eval adapter: stop strings,
stop token ids and the vocabulary limit of a tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from melt_jax.model.config import OuroConfig

Array = jax.Array


def cut_at_stops(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return (text[: min(positions)], True) if positions else (text, False)


def stop_ids_for(tokenizer, stops: Sequence[str]) -> set[int]:
    """The token ids that end generation for a tokenizer (melt_jax.data.tokenizer.Tokenizer) and stop
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
