"""The project's exception hierarchy.

Library code (net_esd, model_loader, gputracker) raises these; exactly one place per
process (the worker's or the runner's ``main``) turns them into a status, a
``failed_models.txt`` line and an exit code. Every message names the model and the cause.
"""

from __future__ import annotations


class ESDError(Exception):
    """Base class. ``transient`` failures may succeed when retried (hub timeouts, OOM)."""

    transient = False


class InputError(ESDError):
    """Bad user input: a model list, a flag value, an id that cannot be parsed."""


class ModelNotFoundError(ESDError):
    """The repository, revision or local directory does not exist."""


class GatedModelError(ESDError):
    """The hub refused access: gated or private repository, missing or wrong token."""


class NoWeightsError(ESDError):
    """The model exists but holds no weight files the analysis can read."""


class CorruptCheckpointError(ESDError):
    """A weight file is truncated, garbage, or its index names missing tensors."""


class AdapterBaseError(ESDError):
    """An adapter's base model cannot be determined or loaded."""


class ShapeMismatchError(ESDError):
    """An adapter's tensors do not fit the base model's tensors."""


class UnsupportedFormatError(ESDError):
    """A format the analysis cannot read as numbers (packed quantized weights, unknown adapters)."""


class TransientError(ESDError):
    """A failure worth retrying: network timeout, hub 5xx, CUDA out of memory."""

    transient = True


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` is worth retrying: our transient errors, OOM, and network timeouts."""
    if isinstance(exc, ESDError):
        return exc.transient
    name = type(exc).__name__
    if name in {"OutOfMemoryError", "ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout"}:
        return True
    return isinstance(exc, (TimeoutError, ConnectionError))
