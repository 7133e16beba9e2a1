"""Fine-tuning (optax, one jitted step, orbax resume), evaluation, and the MiniLM zoo.

    from fisher_jax.train import FinetuneConfig, finetune, evaluate, build_zoo
    model, history = finetune(FinetuneConfig(task="rte", model=BASE, output_dir="out/rte"))
    evaluate(model, "rte")                      # {"accuracy", "score", "num_examples", ...}

Submodules are imported on first use, so ``import fisher_jax.train`` stays cheap.
"""

from __future__ import annotations

import importlib

_API = {
    "FinetuneConfig": "fisher_jax.train.finetune",
    "finetune": "fisher_jax.train.finetune",
    "make_optimizer": "fisher_jax.train.finetune",
    "make_train_step": "fisher_jax.train.finetune",
    "add_finetune_args": "fisher_jax.train.finetune",
    "run_finetune": "fisher_jax.train.finetune",
    "evaluate": "fisher_jax.train.evaluate",
    "predict": "fisher_jax.train.evaluate",
    "add_evaluate_args": "fisher_jax.train.evaluate",
    "run_evaluate": "fisher_jax.train.evaluate",
    "ZOO_BUDGETS": "fisher_jax.train.zoo",
    "ZOO_TASKS": "fisher_jax.train.zoo",
    "build_zoo": "fisher_jax.train.zoo",
    "build_zoos": "fisher_jax.train.zoo",
    "seed_root": "fisher_jax.train.zoo",
    "load_zoo": "fisher_jax.train.zoo",
    "zoo_paths": "fisher_jax.train.zoo",
    "add_zoo_args": "fisher_jax.train.zoo",
    "run_zoo": "fisher_jax.train.zoo",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fisher_jax.train' has no attribute '{name}'")
