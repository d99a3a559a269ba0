"""Shared test setup: the project root on sys.path, and no test ever reaches the network.

A test that requests the ``hub`` fixture talks to a local stand-in of the Hugging Face hub
(tests/hub_server.py) at 127.0.0.1, and to nothing else.
"""

import atexit
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Depth orders cached on disk (layer_order) go to a folder of this session, never the user's.
_CACHE = tempfile.mkdtemp(prefix="esd-test-cache-")
os.environ["ESD_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


# The suite runs on pytest-xdist's workers (pyproject's addopts: --dist loadgroup), a test file
# at a time on each. The files that start a local Ray or submit to the machine's one Slurm
# cluster are one group, run in turn on one worker, so that two never share a cluster.
_CLUSTER_FILES = frozenset({"test_backend_ray.py", "test_backend_slurm.py",
                            "test_cluster_runs.py", "test_custom_metrics.py",
                            "test_metric_inputs.py"})


def pytest_collection_modifyitems(items):
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("cluster" if name in _CLUSTER_FILES else name))


@pytest.fixture(autouse=True)
def no_network(request, monkeypatch):
    """Every test runs offline; a hub API call would be a bug, so it fails loudly. Tests using
    the ``hub`` stand-in are online, but reach 127.0.0.1 only (see ``hub``)."""
    if "hub" in request.fixturenames:
        return
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("the test reached for the network")

    monkeypatch.setattr(HfApi, "model_info", refuse)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running hub stand-in (``tests.hub_server.HubServer``) that this process's
    huggingface_hub talks to, with a fresh cache at ``hub.cache``; stopped at teardown.
    Sockets may connect to 127.0.0.1 only: anything else fails the test."""
    from huggingface_hub.utils import close_session

    from tests.hub_server import HubServer

    with HubServer() as server:
        server.cache = tmp_path / "hf_home" / "hub"
        point_client_at(server, monkeypatch)
        close_session()  # a fresh HTTP client: no connection pooled to another test's server
        try:
            yield server
        finally:
            close_session()


def point_client_at(server, monkeypatch) -> None:
    """Make this process's (already imported) huggingface_hub use ``server`` for one test.

    huggingface_hub reads HF_ENDPOINT once, at import, into ``constants.ENDPOINT`` and what is
    built from it: the resolve URL template, the hub hosts and origins it trusts with
    redirects, and the module-level ``HfApi`` behind ``huggingface_hub.model_info`` & co. All
    are patched, with the environment of ``server.client_env`` mirrored in the constants read
    at import (offline mode, telemetry, timeouts, cache, token file).
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    from tests.hub_server import CLIENT_TIMEOUT_S, CLIENT_UNSET_VARS

    cache, endpoint = server.cache, server.endpoint
    home = cache.parent
    for key in CLIENT_UNSET_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in server.client_env(cache).items():
        monkeypatch.setenv(key, value)
    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_DISABLE_XET": True,
        "HF_HUB_ETAG_TIMEOUT": CLIENT_TIMEOUT_S, "HF_HUB_DOWNLOAD_TIMEOUT": CLIENT_TIMEOUT_S,
        "HF_HOME": str(home), "HF_HUB_CACHE": str(cache),
        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
    }.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(endpoint)})
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    for method in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, method, _loopback_only(getattr(socket.socket, method)))


def _loopback_only(connect):
    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] != "127.0.0.1":
            raise AssertionError(f"the test reached for {address[0]}: only the hub stand-in "
                                 "at 127.0.0.1 may be reached")
        return connect(sock, address)
    return guarded


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A safetensors checkpoint of a one-block Llama and a small conv net (the custom-metric
    tests' model): (its directory, its tensors)."""
    from result_fixtures import conv_net, llama_like
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ckpt")
    tensors = {**llama_like(5, blocks=1), **conv_net(6)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / "model.safetensors"))
    return root, tensors
