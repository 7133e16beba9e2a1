"""What each body parameter *is*, independent of the family's naming.

Statistics and merges ask ``param_role("encoder/layer/3/attention/self/query/kernel")`` and get
``Role(layer=3, role="query", leaf="kernel")``; DistilBERT's ``q_lin`` answers the same. This keeps
the Fisher-node mapping (SPEC §3) and RegMean free of family-specific name matching.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

# Role names. Dense roles carry a kernel [in, out] and a bias [out].
QUERY, KEY, VALUE, ATTN_OUT, ATTN_LN = "query", "key", "value", "attn_out", "attn_ln"
FFN_IN, FFN_OUT, FFN_LN = "ffn_in", "ffn_out", "ffn_ln"
EMBEDDINGS, POOLER = "embeddings", "pooler"

DENSE_ROLES = (QUERY, KEY, VALUE, ATTN_OUT, FFN_IN, FFN_OUT)

_LAYER_RULES = [
    # BERT / RoBERTa / ELECTRA
    (r"attention/self/query", QUERY),
    (r"attention/self/key", KEY),
    (r"attention/self/value", VALUE),
    (r"attention/output/dense", ATTN_OUT),
    (r"attention/output/LayerNorm", ATTN_LN),
    (r"intermediate/dense", FFN_IN),
    (r"output/dense", FFN_OUT),
    (r"output/LayerNorm", FFN_LN),
    # DistilBERT
    (r"attention/q_lin", QUERY),
    (r"attention/k_lin", KEY),
    (r"attention/v_lin", VALUE),
    (r"attention/out_lin", ATTN_OUT),
    (r"sa_layer_norm", ATTN_LN),
    (r"ffn/lin1", FFN_IN),
    (r"ffn/lin2", FFN_OUT),
    (r"output_layer_norm", FFN_LN),
]
_LAYER_RX = re.compile(r"^(?:body/)?(?:encoder|transformer)/layer/(\d+)/(.+)/(kernel|bias|scale)$")


class Role(NamedTuple):
    layer: Optional[int]  # None for embeddings and pooler
    role: str
    leaf: str  # kernel | bias | scale | embedding


def param_role(path: str) -> Role:
    """Role of a body parameter given its path (with or without the leading ``body/``)."""
    m = _LAYER_RX.match(path)
    if m:
        layer, module, leaf = int(m.group(1)), m.group(2), m.group(3)
        for pattern, role in _LAYER_RULES:
            if module == pattern:
                return Role(layer, role, leaf)
        raise ValueError(f"unknown encoder-layer parameter '{path}'")
    leaf = path.rsplit("/", 1)[-1]
    stripped = path[5:] if path.startswith("body/") else path
    if stripped.startswith("embeddings") :  # includes ELECTRA's embeddings_project
        return Role(None, EMBEDDINGS, leaf)
    if stripped.startswith("pooler/"):
        return Role(None, POOLER, leaf)
    raise ValueError(f"unknown body parameter '{path}'")


def module_path(path: str) -> str:
    """``.../query/kernel`` -> ``.../query`` (the Dense/LayerNorm module that owns a leaf)."""
    return path.rsplit("/", 1)[0]
