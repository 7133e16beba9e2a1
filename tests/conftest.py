"""Shared fixtures: tiny random Hugging Face models of each family, the MiniLM folder, GLUE data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# One JAX compilation cache for the whole run, set before JAX is imported: xdist workers, the
# subprocesses and notebook kernels inherit it, so a program compiled by one test (the same tiny
# model, the same step) is loaded, not compiled again, by the next. A user's own setting wins.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "fisher_jax_tests_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Tiny models: XLA's compile time, not the compiled code, is most of a test's time on CPU, and
# LLVM's optimisation passes are most of the compile (matrix products call precompiled kernels).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
# `or`: the Makefile exports an empty GLUE_DIR when ../shared/glue is missing.
GLUE_DIR = Path(os.environ.get("GLUE_DIR") or REPO.parent / "shared" / "glue")


def tiny_hf_config(model_type: str, num_labels: int = 3):
    """A 2-layer, 4-head, hidden-32 config of each supported family (FFN 37: odd on purpose)."""
    import transformers as tf

    common = dict(vocab_size=99, max_position_embeddings=64, num_labels=num_labels)
    if model_type == "bert":
        return tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                             type_vocab_size=2, **common)
    if model_type == "roberta":
        return tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, **common)
    if model_type == "distilbert":
        return tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37, **common)
    if model_type == "electra":
        return tf.ElectraConfig(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37, **common)
    if model_type == "deberta":  # relative attention, both terms, span 6 < typical test lengths
        return tf.DebertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                type_vocab_size=2, relative_attention=True, max_relative_positions=6,
                                pos_att_type=["c2p", "p2c"], **common)
    if model_type == "deberta-v2":  # as DeBERTa-v3: log buckets, shared keys, normed table, no absolute positions
        return tf.DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                  relative_attention=True, position_buckets=4, max_relative_positions=8,
                                  pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
                                  position_biased_input=False, **common)
    raise ValueError(model_type)


def random_batch(model_type: str, batch: int = 3, length: int = 10, seed: int = 0, vocab: int = 99,
                 pad_id: int = 0):
    """Token ids with ragged padding and (for BERT/ELECTRA) two segments."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, vocab, (batch, length)).astype(np.int32)
    lengths = np.linspace(length, 3, batch).astype(int)
    am = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    ids[am == 0] = pad_id
    if model_type in ("bert", "electra"):
        tt = ((np.arange(length)[None, :] >= lengths[:, None] // 2) * am).astype(np.int32)
    else:
        tt = np.zeros_like(ids)
    return ids, am, tt


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from fisher_jax.models import hub

    return hub.minilm_path()


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    assert (GLUE_DIR / "RTE" / "dev.tsv").is_file(), f"GLUE data not found at {GLUE_DIR} (set GLUE_DIR)"
    return GLUE_DIR
