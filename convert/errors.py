"""The error type of the converter."""

from melt_jax.errors import CheckpointError


class ConversionError(CheckpointError):
    """A checkpoint cannot be converted: a missing, unexpected or misshapen tensor, a bad weights file."""
