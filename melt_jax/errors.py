"""The errors melt_jax raises for bad input and for runs that cannot go on: each names what is
wrong. Every one derives from MeltJaxError, which the command lines catch to print a one-line message
and exit with status 2 (the converter: 1). Each subclass also derives from the built-in kind of error
it is: ValueError for a bad config, data, checkpoint, mesh or generation setting, RuntimeError for a
training run that cannot go on (TrainingError)."""

from __future__ import annotations


class MeltJaxError(Exception):
    """Bad input to melt_jax: a config, data, checkpoint, mesh, generation or training setting."""


class ConfigError(MeltJaxError, ValueError):
    """A config field is missing, has the wrong type, or has a value this library cannot run."""


class DataError(MeltJaxError, ValueError):
    """A data source, field, tokenizer or batch setting is missing or has a value that cannot be used."""


class CheckpointError(MeltJaxError, ValueError):
    """A checkpoint cannot be read or written: missing or corrupt files, an existing destination."""


class ShardingError(MeltJaxError, ValueError):
    """A mesh that does not fit the devices, or a param without sharding rule."""


class GenerationError(MeltJaxError, ValueError):
    """Generation cannot run on this input: a bad prompt, setting, model or checkpoint."""


class TrainingError(MeltJaxError, RuntimeError):
    """A training run that cannot go on: a non-finite loss, a teacher that does not fit the student."""
