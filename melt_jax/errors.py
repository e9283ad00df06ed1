"""The errors melt_jax raises for bad input and for runs that cannot go on: each names what is
wrong. Every one derives from MeltJaxError, which the command lines catch (`exit_status`) to print
`PROG: error: MESSAGE` on stderr and exit with status 2 for bad input, 1 for a run that failed once
started (TrainingError, an OSError such as a full disk). Each subclass also derives from the built-in kind of error
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


def exit_status(prog: str, error: BaseException) -> int:
    """Prints `prog: error: message` on stderr and returns the exit status of the command lines:
    1 for a failure at run time (TrainingError, an OSError other than a missing file), 2 for bad input
    (every other error, a missing file included)."""
    import sys

    message = str(error) if isinstance(error, MeltJaxError) else f"{type(error).__name__}: {error}"
    print(f"{prog}: error: {message}", file=sys.stderr)
    failed = isinstance(error, (TrainingError, OSError)) and not isinstance(error, FileNotFoundError)
    return 1 if failed else 2
