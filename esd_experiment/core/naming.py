"""Which tensors are layers, and what kind (docs/metrics.md section 1): the naming rules of
checkpoints (expert stacks, embeddings, heads, GGUF slices ``name[i]``), shared by the readers
that split stacks and the estimator that types rows. Pure string rules: no torch."""

from __future__ import annotations

import re

# Last name components that hold weights besides "...weight": packed quantized weights (so
# they get an unsupported_dtype row) and fused expert projections stored without ".weight".
WEIGHT_NAME_ENDINGS = ("weight", "weight_packed", "_proj", "_blocks")
# Embedding tables not named "embed...": GPT-2, T5 and relative-position bucket tables.
# GGUF's (llama.cpp) token_embd / pos_embd / token_types.
EMBEDDING_OWNERS = ("wte", "wpe", "shared", "emb", "tok_emb", "pos_emb", "relative_attention_bias",
                    "token_embd", "pos_embd", "token_types")
LM_HEAD_OWNERS = ("lm_head", "embed_out")
# A head stored as a top-level "output" (GGUF's output.weight, InternLM2).
LM_HEAD_NAMES = ("output",)
# Owners named after embeddings that are projections, not tables (ALBERT's
# embedding_hidden_mapping_in, ELECTRA's embeddings_project): nn.Linear, typed linear.
PROJECTION_WORDS = ("proj", "mapping", "linear", "dense")
# Fused expert stacks stored without ".weight" (DBRX: experts.mlp.w1, v1, w2).
_EXPERT_MATRIX = re.compile(r"^[wv]\d+$")
# One matrix of a stack stored 3-D, read on its own: ``<tensor name>[index]`` (a GGUF's
# experts and per-head matrices, which the GGUF reader hands out one by one).
_SLICE = re.compile(r"^(?P<base>.+)\[(?P<index>\d+)\]$")


# ---------------------------------------------------------------------------------------------
# Which tensors are layers (metrics.md section 1).

# IBM's ParallelExperts, whose (E, out, in) stacks JetMoE's MLP names without a word of
# experts (GraniteMoE's sit in a ``block_sparse_moe``); elsewhere a module of these names may
# well be a Conv1d, so only these paths.
_PARALLEL_EXPERTS = (".mlp.input_linear.", ".mlp.output_linear.")


def is_expert_stack(name: str) -> bool:
    """True for a name inside a mixture-of-experts module (``experts``, ``moe``, GGUF's
    ``ffn_gate_exps``, JetMoE's ``mlp.input_linear``): a 3-D tensor there is a stack of
    expert matrices, anywhere else a Conv1d kernel."""
    low = f".{name.lower()}."
    return any(p in low for p in _PARALLEL_EXPERTS) or any(
        "expert" in p or "moe" in p or p.endswith("_exps") for p in name.lower().split("."))


# One expert where the name says so otherwise: Mixtral GGUFs made before llama.cpp stacked the
# experts (``blk.0.ffn_gate.3``), Switch Transformers' and NLLB-MoE's ``experts.expert_0``.
_GGUF_ONE_EXPERT = re.compile(r"^ffn_(gate|up|down)\.\d+$")
_NUMBERED_EXPERT = re.compile(r"^expert_\d+$")


def is_one_expert(name: str) -> bool:
    """True for one expert's own matrix: an ``experts`` module's numbered member
    (``block_sparse_moe.experts.3.w1``, ``mlp.experts.0.down_proj``, ``experts.expert_0.wi``,
    a pre-stack Mixtral GGUF's ``ffn_gate.3``); a shared expert, which
    every token goes through, is not one."""
    parts = name.lower().split(".")
    return any(("expert" in p and "shared" not in p and nxt.isdigit())
               or _GGUF_ONE_EXPERT.match(f"{p}.{nxt}") or _NUMBERED_EXPERT.match(p)
               for p, nxt in zip(parts, parts[1:], strict=False))


def _slice_of(name: str) -> tuple[str, str]:
    """(tensor name, ``[index]`` suffix or "") of a layer name."""
    m = _SLICE.match(name)
    return (m["base"], f"[{m['index']}]") if m else (name, "")


def is_weight_name(name: str) -> bool:
    """True for weight tensors: ``*.weight``, packed ``qweight``/``weight_packed``, fused expert
    stacks (``experts.gate_up_proj``, gpt-oss ``_blocks``, DBRX's ``experts.mlp.w1``/``v1``/``w2``).

    Biases, quantization scales and zero points, and buffers (masks, position ids) are not.
    """
    name = _slice_of(name)[0]
    last = name.rsplit(".", 1)[-1]
    return last.endswith(WEIGHT_NAME_ENDINGS) or (
        _EXPERT_MATRIX.match(last) is not None and is_expert_stack(name))


def longname_of(name: str) -> str:
    """The name without ``.weight`` (a slice keeps its index: ``x.weight[2]`` -> ``x[2]``)."""
    name, index = _slice_of(name)
    return (name[: -len(".weight")] if name.endswith(".weight") else name) + index


def layer_type_of(name: str, ndim: int) -> str:
    """``layer_type`` from a checkpoint name and the tensor's rank.

    3-D tensors are Conv1d / ConvTranspose1d kernels, ``conv1d``, unless they sit in a
    mixture-of-experts module (``is_expert_stack``) and no name component says ``conv``: then
    they are fused experts; 4-D and up are convolutions, ``conv{ndim-2}d``. 2-D tensors owned by an embedding module
    (``embed_tokens``, ``wte``, ``word_embeddings``, T5's ``shared``...) are ``embedding``,
    ``lm_head`` / GPT-NeoX ``embed_out`` / a top-level ``output`` are ``lm_head``, everything
    else ``linear``. One expert's matrix (``is_one_expert``, or a slice ``name[e]`` of an
    expert stack) is ``expert``, whatever its layout; a slice of any other stack is ``linear``.
    """
    base, index = _slice_of(name)
    parts = longname_of(base).lower().split(".")
    if ndim == 2 and (is_one_expert(base) or (index and is_expert_stack(base))):
        return "expert"
    if ndim == 3 and is_expert_stack(name) and not any("conv" in p for p in parts):
        return "expert"
    if ndim >= 3:
        return f"conv{ndim - 2}d"
    owner = parts[-1]
    if owner in LM_HEAD_OWNERS or owner.endswith("lm_head") or parts == list(LM_HEAD_NAMES):
        return "lm_head"
    if owner in EMBEDDING_OWNERS or ("embed" in owner and not any(
            w in owner for w in PROJECTION_WORDS)):
        return "embedding"
    return "linear"
