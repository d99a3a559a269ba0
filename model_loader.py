"""Open models from the Hugging Face hub or a local directory as tensor streams:
``open_model(ModelRequest("org/name@revision"))`` gives a ``LoadedModel`` whose
``iter_tensors()`` yields ``(name, tensor)`` one at a time (adapters merged into their base).
The loader lives in ``esd_experiment/loader/``.
"""

from esd_experiment.loader.opener import (
    ADAPTER_RELATIONS,
    HubClient,
    LoadedModel,
    ModelRequest,
    open_model,
    open_models,
    parse_model_id,
    scrub,
)

__all__ = ["ADAPTER_RELATIONS", "HubClient", "LoadedModel", "ModelRequest", "open_model",
           "open_models", "parse_model_id", "scrub"]
