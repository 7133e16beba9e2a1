"""Flax sequence classifiers (BERT-family encoders, GPT-2 and Llama-family decoders) with mask-node
collections, and Hugging Face load/export. One registry entry per family: :mod:`.families`."""

from .config import SUPPORTED_MODEL_TYPES, ArchConfig
from .hub import from_config, from_pretrained, load_tokenizer, minilm_path, save_pretrained, state_dict
from .model import Model, init_params, ones_masks, variables

__all__ = [
    "SUPPORTED_MODEL_TYPES", "ArchConfig", "Model", "from_config", "from_pretrained", "init_params",
    "load_tokenizer", "minilm_path", "ones_masks", "save_pretrained", "state_dict", "variables",
]
