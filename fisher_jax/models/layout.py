"""What each body parameter *is*, independent of the family's naming.

Statistics and merges ask ``param_role("encoder/layer/3/attention/self/query/kernel")`` and get
``Role(layer=3, role="query", leaf="kernel")``; DistilBERT's ``q_lin``, GPT-2's ``attn/q_proj`` and
Llama's ``self_attn/q_proj`` answer the same. The rules live in each family's registry entry
(:mod:`fisher_jax.models.families`); this keeps the Fisher-node mapping (SPEC §3) and RegMean
free of family-specific name matching.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

# Role names. Dense roles carry a kernel [in, out] and (in most families) a bias [out].
QUERY, KEY, VALUE, ATTN_OUT, ATTN_LN = "query", "key", "value", "attn_out", "attn_ln"
FFN_IN, FFN_OUT, FFN_LN = "ffn_in", "ffn_out", "ffn_ln"
# Gated FFNs (SwiGLU): act(gate) * up. The gate's unit i belongs to neuron i like FFN_IN's.
FFN_GATE = "ffn_gate"
EMBEDDINGS, POOLER = "embeddings", "pooler"
FINAL_LN = "final_ln"  # decoders' norm after the last layer (GPT-2 ln_f, Llama norm)

DENSE_ROLES = (QUERY, KEY, VALUE, ATTN_OUT, FFN_IN, FFN_GATE, FFN_OUT)


class Role(NamedTuple):
    layer: Optional[int]  # None for embeddings, pooler and final norms
    role: str
    leaf: str  # kernel | bias | scale | embedding


@functools.lru_cache(maxsize=4096)
def param_role(path: str) -> Role:
    """Role of a body parameter given its path (with or without the leading ``body/``)."""
    from .families import REGISTRY

    stripped = path[5:] if path.startswith("body/") else path
    if "/" in stripped:
        for fam in REGISTRY.values():
            hit = fam.role(stripped)
            if hit is not None:
                return Role(*hit)
    raise ValueError(f"unknown body parameter '{path}'")


def module_path(path: str) -> str:
    """``.../query/kernel`` -> ``.../query`` (the Dense/LayerNorm module that owns a leaf)."""
    return path.rsplit("/", 1)[0]
