"""Reading GPU memory through NVML.

GPU indices are positions in PCI bus order, the order CUDA uses when the child's
``CUDA_DEVICE_ORDER=PCI_BUS_ID``; NVML ignores ``CUDA_VISIBLE_DEVICES``, so the indices are
the machine's physical GPUs whatever the parent's environment says.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from esd_experiment.core.errors import ESDError, InputError

logger = logging.getLogger(__name__)

_MIB = 2**20
_NO_NVML = "no NVIDIA driver/NVML ({cause}): use --device cpu"

_init_lock = threading.Lock()
_initialised = False


class GPUQueryError(ESDError):
    """NVML was initialised but a GPU could not be read (a GPU lost from the bus, a driver reset)."""


@dataclass(frozen=True)
class GPUStatus:
    """One memory reading of one GPU."""

    index: int
    memory_used_mb: float
    memory_total_mb: float


def _ensure_nvml():
    """Import pynvml and initialise NVML once per process; InputError when it is unavailable."""
    global _initialised
    try:
        import pynvml
    except ImportError as exc:
        raise InputError(_NO_NVML.format(cause=f"pynvml is not installed: {exc}")) from exc
    with _init_lock:
        if not _initialised:
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                raise InputError(_NO_NVML.format(cause=str(exc))) from exc
            _initialised = True
    return pynvml


def _used_mb(pynvml, handle) -> tuple[float, float]:
    """(used, total) in MiB. The v2 call leaves out the driver's reserved memory, which the
    v1 call counts as used (several hundred MiB on an idle recent GPU)."""
    try:
        info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
    except pynvml.NVMLError:  # older drivers have no v2 entry point
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return info.used / _MIB, info.total / _MIB


def nvml_query() -> list[GPUStatus]:
    """Memory readings of every GPU on the machine, indexed in PCI bus order.

    Raises InputError when NVML cannot start (no driver, no library) and GPUQueryError when a
    GPU cannot be read.
    """
    pynvml = _ensure_nvml()
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        keyed = []
        for handle in handles:
            pci = pynvml.nvmlDeviceGetPciInfo(handle)
            keyed.append(((pci.domain, pci.bus, pci.device), handle))
        keyed.sort(key=lambda item: item[0])
        readings = []
        for index, (_, handle) in enumerate(keyed):
            used, total = _used_mb(pynvml, handle)
            readings.append(GPUStatus(index, used, total))
    except pynvml.NVMLError as exc:
        raise GPUQueryError(f"NVML could not read the GPUs: {exc}") from exc
    return readings


def detect_gpus() -> list[int]:
    """Indices of the machine's GPUs; [] when there is no NVIDIA driver (CPU mode)."""
    try:
        return [status.index for status in nvml_query()]
    except InputError as exc:
        logger.info("no NVIDIA GPU found, so models are analysed on CPUs (%s)", exc)
        return []
