"""Error classes that decide what a worker does with a failing message."""

from __future__ import annotations


class GreetflowError(Exception):
    """Base of our own errors."""


class PermanentError(GreetflowError):
    """Retrying cannot help (bad input, a missing template, a font without the glyphs):
    the message goes straight to the DLQ and the job is marked failed."""


class ConfigError(GreetflowError):
    """The settings or the environment are wrong; the message says what to change."""
