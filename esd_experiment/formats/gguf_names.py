"""Hugging Face names for the tensors of a GGUF model (``hf_names``), for gguf_file.py.

The names come from transformers: its ``load_gguf_checkpoint`` makes the model's config from
the GGUF metadata, the architecture's model is built from it on the meta device (no weights),
and its ``get_gguf_hf_weights_map`` applies gguf's tensor-name map to that model's names
(``blk.0.attn_q.weight`` -> ``model.layers.0.self_attn.q_proj.weight``).

Two costs of those functions are avoided, with the same names:

- transformers is given a copy of the header without the tokenizer's arrays (gguf_file's
  ``_config_gguf``): gguf's reader parses every string of a vocabulary and its merges one by
  one, 15 s for Llama 3's 128256 tokens, and the config needs none of them.
- gguf's ``TensorNameMap`` is built once (``one_tensor_name_map``), not at every module of the
  model: 1047 maps and 52 s for an 80-layer llama.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

_GGUF_BLOCK = re.compile(r"^blk\.(?P<n>\d+)\.")


def hf_names(config_gguf: bytes, arch: str, names: set[str], model_id: str) -> dict[str, str]:
    """GGUF name -> Hugging Face name for ``names`` (the GGUF names of every split part);
    {} when transformers does not know the architecture, which leaves the GGUF names.

    ``config_gguf``: a GGUF file holding the model's metadata and tensor names
    (gguf_file's ``_config_gguf``); ``arch``: its ``general.architecture``. A tensor the map
    leaves out inside a block (3-D expert stacks, which transformers splits or fuses on
    loading) goes under its block's Hugging Face name (``model.layers.3.ffn_up_exps.weight``).
    A name two tensors would share is left out for both."""
    try:
        import torch
        import transformers
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
        )

        with tempfile.TemporaryDirectory(prefix="esd-gguf-") as tmp:
            path = Path(tmp) / "config.gguf"
            path.write_bytes(config_gguf)
            config = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
        config["tie_word_embeddings"] = "output.weight" not in names  # over all split parts
        hf_config = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
        with one_tensor_name_map():
            mapping = get_gguf_hf_weights_map(
                model, TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config))
    except Exception as exc:  # any failure here only costs the HF names, never a number
        logger.info("%s: GGUF architecture %r has no Hugging Face name map (%s: %s); GGUF "
                    "tensor names are kept", model_id, arch, type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "")
        return {}
    mapping = {g: h for g, h in mapping.items() if g in names}
    blocks: dict[str, str] = {}
    for g, h in mapping.items():
        m, parts = _GGUF_BLOCK.match(g), h.split(".")
        if m and m["n"] in parts:
            blocks.setdefault(m["n"], ".".join(parts[:parts.index(m["n"]) + 1]))
    for g in sorted(names - mapping.keys()):
        m = _GGUF_BLOCK.match(g)
        if m and m["n"] in blocks:
            mapping[g] = f"{blocks[m['n']]}.{g[m.end():]}"
    taken = Counter(mapping.values())
    return {g: h for g, h in mapping.items() if taken[h] == 1}


_NAME_MAP_LOCK = threading.Lock()


@contextlib.contextmanager
def one_tensor_name_map() -> Iterator[None]:
    """Within it, gguf's ``get_tensor_name_map(arch, blocks)`` builds each map once.

    transformers' ``get_gguf_hf_weights_map`` asks for the map anew at every module of the
    model it walks (it looks the function up in gguf at each call), and a map is as large as
    the model is deep. The map depends on its arguments alone, so the names are the same."""
    import gguf

    with _NAME_MAP_LOCK:
        unshared = gguf.get_tensor_name_map
        gguf.get_tensor_name_map = functools.cache(unshared)
        try:
            yield
        finally:
            gguf.get_tensor_name_map = unshared
