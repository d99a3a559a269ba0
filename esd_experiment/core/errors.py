"""The project's exception hierarchy.

Library code (net_esd, model_loader, gputracker) raises these; exactly one place per
process (the worker's or the runner's ``main``) turns them into a status, a
``failed_models.txt`` line and an exit code. Every message names the model and the cause.
"""

from __future__ import annotations

import errno
import traceback
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]  # esd_experiment/: the frames that are ours


class ESDError(Exception):
    """Base class. ``transient`` failures may succeed when retried (hub timeouts, OOM)."""

    transient = False


class InputError(ESDError):
    """Bad user input: a model list, a flag value, an id that cannot be parsed."""


class ModelNotFoundError(ESDError):
    """The repository, revision or local directory does not exist."""


class RevisionNotFoundError(ModelNotFoundError):
    """The repository exists, the revision (branch, tag or commit) does not."""


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


class NetworkError(TransientError):
    """The hub could not be reached: no connection, no name resolution, a dropped transfer.
    Several models failing so in a row is an outage, not a property of the models."""


# Exception classes that mean "the network failed", by the top-level package defining them and
# class name; matched along each exception's class hierarchy, so subclasses count too
# (httpx's TransportError covers ConnectError, ReadTimeout, RemoteProtocolError, ...).
# Names, not imports: nothing here loads an HTTP library.
_NETWORK_CLASSES = {
    "httpx": frozenset({"TransportError"}),
    "httpx2": frozenset({"TransportError"}),
    "requests": frozenset({"ConnectionError", "Timeout", "ChunkedEncodingError"}),
    "urllib3": frozenset({"TimeoutError", "ProtocolError", "MaxRetryError"}),
    "http": frozenset({"IncompleteRead"}),
}
# ConnectionError subclasses that are a refusal by configuration, not a network failure.
_NOT_NETWORK = frozenset({"OfflineModeIsEnabled"})


def _network_class(exc: BaseException) -> bool:
    classes = type(exc).__mro__
    if any(cls.__name__ in _NOT_NETWORK for cls in classes):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):  # socket timeouts, refused, reset
        return True
    return any(cls.__name__ in _NETWORK_CLASSES.get(cls.__module__.partition(".")[0], ())
               for cls in classes)


def is_network_error(exc: BaseException) -> bool:
    """True when ``exc``, or an exception it was raised from or while handling, is a network
    failure: a timeout, a refused or dropped connection, a broken HTTP exchange.

    The chain is followed through ``__cause__`` and ``__context__`` (unless suppressed with
    ``from None``), because libraries wrap the network error in their own ("not in the local
    cache", "max retries exceeded").
    """
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if _network_class(link):
            return True
        seen.add(id(link))
        link = link.__cause__ if link.__cause__ is not None else (
            None if link.__suppress_context__ else link.__context__)
    return False


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` is worth retrying: our transient errors, out of memory, and network
    failures (``is_network_error``). Any other ``ESDError`` is not, whatever caused it."""
    if isinstance(exc, ESDError):
        return exc.transient
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return is_network_error(exc)


def internal_error(exc: BaseException, stage: str = "") -> str:
    """An exception the code did not expect, in one line: where it was raised (the innermost
    frame of this project, else the innermost), the stage and the exception itself, e.g.
    ``at formats/stream.py:120 in stage analyse: StopIteration (no message)``."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(_PACKAGE)]
    where = (ours or frames)[-1:]
    place = ""
    if where:
        path = Path(where[0].filename).resolve()
        name = path.relative_to(_PACKAGE).as_posix() if ours else path.name
        place = f"at {name}:{where[0].lineno} "
    during = f"in stage {stage}: " if stage else ""
    return (f"{place}{during}{type(exc).__name__} ({str(exc) or 'no message'}); the traceback "
            "is in the model's log")


# A full disk or an exhausted quota: no model is to blame, the run stops and says where.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` of a full disk (ENOSPC) or quota (EDQUOT) that ``exc`` is, or was
    raised from or while handling; None when it is no such failure."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, OSError) and link.errno in DISK_FULL_ERRNOS:
            return link
        seen.add(id(link))
        link = link.__cause__ if link.__cause__ is not None else (
            None if link.__suppress_context__ else link.__context__)
    return None
