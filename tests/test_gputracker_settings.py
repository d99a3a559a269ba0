"""The dispatcher's settings checked before anything runs, and its GPU readings from NVML."""

import pytest

from esd_experiment.core.errors import InputError
from gputracker import Dispatcher, detect_gpus, nvml_query
from tests.test_gputracker import FakeGPUs, gpu_dispatcher, py_job


@pytest.mark.parametrize(
    ("gpus", "kwargs", "message"),
    [
        ([0], {"gpus_per_job": 2}, "--num_gpus_per_job 2 needs between 1 and the 1 GPU"),
        ([0, 0], {}, "--gpus lists a GPU twice"),
        ([0], {"max_check": 0}, "--max_check must be at least 1"),
        ([0], {"memory_threshold_mb": 0}, "--gpu_memory_threshold must be positive"),
        (None, {"cpu_slots": 0}, "cpu_slots must be at least 1"),
    ],
)
def test_bad_settings_are_refused(gpus, kwargs, message):
    with pytest.raises(InputError, match=message):
        Dispatcher(gpus, query=FakeGPUs({0: 0.0}), **kwargs)


def test_gpu_missing_from_the_machine_is_refused(tmp_path):
    dispatcher = gpu_dispatcher([7], FakeGPUs({0: 0.0, 1: 0.0}))
    with pytest.raises(
        InputError, match=r"asks for GPU\(s\) \[7\] but the machine has GPU\(s\) \[0, 1\]"
    ):
        dispatcher.run([py_job("j", "pass", tmp_path)])


def _nvml_works() -> bool:
    try:
        nvml_query()
    except InputError:
        return False
    return True


@pytest.mark.skipif(_nvml_works(), reason="this machine has an NVIDIA driver")
def test_without_nvml_query_names_the_cpu_fallback_and_detect_finds_none():
    with pytest.raises(InputError, match="no NVIDIA driver/NVML .*: use --device cpu"):
        nvml_query()
    assert detect_gpus() == []


@pytest.mark.skipif(not _nvml_works(), reason="needs an NVIDIA driver")
def test_nvml_query_reads_every_gpu():
    readings = nvml_query()
    assert [r.index for r in readings] == list(range(len(readings)))
    assert all(0 <= r.memory_used_mb <= r.memory_total_mb for r in readings)
    assert detect_gpus() == [r.index for r in readings]


