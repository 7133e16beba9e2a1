"""Flax parameter trees <-> Hugging Face state dicts and folders, for every registered family.

Each family's :meth:`~fisher_jax.models.families.Family.hf_ref` says where a Flax leaf lives in the
HF state dict (renamed, transposed for ``Linear``, or one slice of a fused projection). This module
holds no ``Model``: :mod:`.model` and :mod:`.hub` both import it, so neither imports the other.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from .. import tree
from ..errors import FisherJaxError
from .config import ArchConfig
from .families import HFRef, family

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
    "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
)
# Export dtypes: "float32" (default), "float16", "bfloat16", or "source" (the checkpoint's own).
EXPORT_DTYPES = ("float32", "float16", "bfloat16", "source")


def hf_ref(flax_path: str, model_type: str) -> HFRef:
    return family(model_type).hf_ref(flax_path)


def hf_name(flax_path: str, model_type: str) -> str:
    """``body/encoder/layer/0/attention/self/query/kernel`` -> ``bert.encoder.layer.0.attention.self.query.weight``."""
    return hf_ref(flax_path, model_type).key


def ref_groups(ref: HFRef, arch: Optional[ArchConfig]) -> int:
    """The number of ``[parts]`` groups along a fused tensor's last axis (0 in the ref: one per head)."""
    if ref.groups:
        return ref.groups
    if arch is None:
        raise FisherJaxError(f"'{ref.key}' interleaves its parts per head: the architecture is needed to split it")
    return arch.num_heads


def from_hf_value(value: np.ndarray, ref: HFRef, arch: Optional[ArchConfig] = None) -> np.ndarray:
    """The Flax leaf held in an HF tensor: transposed if ``Linear``, then its slice of a fused projection
    (last axis read as ``[groups, parts, size]``: GPT-2's ``c_attn`` one group, DeBERTa's ``in_proj`` one per head)."""
    value = np.asarray(value, np.float32)
    value = value.T if ref.transpose else value
    if ref.parts > 1:
        groups = ref_groups(ref, arch)
        if value.shape[-1] % (ref.parts * groups):
            raise FisherJaxError(f"'{ref.key}' has last axis {value.shape[-1]}, not divisible into "
                                 f"{groups * ref.parts} parts")
        grouped = value.reshape(value.shape[:-1] + (groups, ref.parts, -1))
        value = grouped[..., ref.part, :].reshape(value.shape[:-1] + (-1,))
    return value


def to_hf_state(arch: ArchConfig, params: Any) -> dict[str, np.ndarray]:
    """The parameters as a Hugging Face (PyTorch-layout) state dict of float32 numpy arrays."""
    fam = family(arch.model_type)
    parts: dict[str, list[tuple[int, np.ndarray, bool, int]]] = {}
    for path, value in tree.flatten(params).items():
        ref = fam.hf_ref(path)
        groups = ref_groups(ref, arch) if ref.parts > 1 else 1
        parts.setdefault(ref.key, []).append((ref.part, np.asarray(value, np.float32), ref.transpose, groups))
    out = {}
    for key, pieces in parts.items():
        pieces.sort(key=lambda p: p[0])
        if len(pieces) > 1:
            groups = pieces[0][3]  # [..., groups, size] per part, stacked to [..., groups, parts, size]
            split = [p[1].reshape(p[1].shape[:-1] + (groups, -1)) for p in pieces]
            value = np.stack(split, axis=-2).reshape(pieces[0][1].shape[:-1] + (-1,))
        else:
            value = pieces[0][1]
        out[key] = np.ascontiguousarray(value.T if pieces[0][2] else value)
    return out


# --------------------------------------------------------------------------- safetensors files
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], set[str]]:
    """Tensors of one ``.safetensors`` file (bfloat16 widened to float32) and the float dtypes seen.

    Read directly (the format is an 8-byte header length, a JSON header, raw little-endian data):
    ``safetensors.numpy`` cannot read bfloat16, which many Hub checkpoints use.
    """
    try:
        raw = memoryview(Path(path).read_bytes())
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(bytes(raw[8:8 + n]))
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise FisherJaxError(f"corrupt or unreadable weights in '{path}': {exc}") from None
    if not isinstance(header, dict):
        raise FisherJaxError(f"corrupt or unreadable weights in '{path}': bad header")
    data = raw[8 + n:]
    out: dict[str, np.ndarray] = {}
    dtypes: set[str] = set()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            dt, shape = info["dtype"], tuple(info["shape"])
            buf = data[start:end]
            if dt == "BF16":
                bits = np.frombuffer(buf, np.uint16).astype(np.uint32) << 16
                arr = bits.view(np.float32)
            else:
                arr = np.frombuffer(buf, _ST_DTYPES[dt])
            out[name] = arr.reshape(shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise FisherJaxError(f"corrupt or unreadable weights in '{path}': tensor '{name}' ({exc})") from None
        if dt in ("BF16", "F16", "F32", "F64"):
            dtypes.add({"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}[dt])
    return out, dtypes


def write_safetensors(state: dict[str, np.ndarray], path: Path, dtype: str = "float32") -> None:
    """Write float tensors as ``dtype`` (float32, float16 or bfloat16; round to nearest even)."""
    import ml_dtypes  # shipped with jax

    codes = {"float32": ("F32", np.float32), "float16": ("F16", np.float16), "bfloat16": ("BF16", ml_dtypes.bfloat16)}
    code, np_dtype = codes[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name in sorted(state):
        value = np.asarray(state[name])
        if np.issubdtype(value.dtype, np.floating):
            value, c = np.ascontiguousarray(value.astype(np.float32).astype(np_dtype)), code
        else:
            c = {np.dtype(v): k for k, v in _ST_DTYPES.items()}[value.dtype]
        b = value.tobytes()
        header[name] = {"dtype": c, "shape": list(value.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def export_dtype(dtype: Optional[str], source_dtype: Optional[str]) -> str:
    """The dtype a model is written in: ``dtype`` (default float32); ``"source"``: the checkpoint's."""
    dtype = dtype or "float32"
    if dtype not in EXPORT_DTYPES:
        from ..tree import did_you_mean

        raise FisherJaxError(f"unknown export dtype '{dtype}' (choose from {', '.join(EXPORT_DTYPES)})"
                             f"{did_you_mean(dtype, EXPORT_DTYPES)}")
    if dtype == "source":
        return source_dtype if source_dtype in ("float16", "bfloat16") else "float32"
    return dtype


def write_pretrained(arch: ArchConfig, params: Any, config: Any, path: Any, source: Optional[str] = None,
                     tokenizer_from: Optional[str] = None, dtype: str = "float32") -> None:
    """config.json + model.safetensors that transformers' AutoModelForSequenceClassification loads."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = config.__class__.from_dict(config.to_dict())
    config.architectures = [family(arch.model_type).hf_class]
    if config.num_labels != arch.num_labels:
        config.num_labels = arch.num_labels
    if arch.num_labels == 1:
        config.problem_type = "regression"
    if dtype != "float32":
        config.dtype = dtype
    config.save_pretrained(str(out))
    write_safetensors(to_hf_state(arch, params), out / "model.safetensors", dtype)
    copy_tokenizer(tokenizer_from or source, out)


def copy_tokenizer(src: Optional[str], out: Path, names: Iterable[str] = TOKENIZER_FILES) -> None:
    if src and Path(src).resolve() != out.resolve():
        for name in names:
            if (Path(src) / name).is_file():
                shutil.copyfile(Path(src) / name, out / name)
