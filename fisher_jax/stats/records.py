"""Statistics records: mask Fisher, full Fisher and Gram sets, and what kind a record is.

numpy only (no JAX): records can be built and inspected anywhere. Files: :mod:`.files`;
fingerprints and metadata: :mod:`.fingerprints`; checks against a model: :mod:`.fits`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

import numpy as np

from .. import tree
from ..errors import FisherJaxError

KINDS = ("mask_fisher", "full_fisher", "gram")
# The Fisher estimators (fisher_jax.stats.fisher); here so that configs can check a name without JAX.
ESTIMATORS = ("empirical", "expected", "sampled", "batch")


def check_estimator(estimator: str) -> str:
    """``estimator`` if it is one of :data:`ESTIMATORS`, else a one-line ``FisherJaxError``."""
    if estimator not in ESTIMATORS:
        raise FisherJaxError(f"unknown estimator '{estimator}'{tree.did_you_mean(str(estimator), ESTIMATORS)} "
                             f"(choose from {', '.join(ESTIMATORS)})")
    return estimator


@dataclasses.dataclass
class MaskFisher:
    """Diagonal Fisher of the mask nodes (SPEC §2): ``head [L, H]``, ``neuron [L, I]`` (float32).

    ``num_examples`` counts the real (weight > 0) examples; ``meta`` says how it was made.
    """

    head: np.ndarray
    neuron: np.ndarray
    num_examples: int
    meta: dict = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"MaskFisher(head={tuple(np.shape(self.head))}, neuron={tuple(np.shape(self.neuron))}, "
                f"num_examples={self.num_examples}, estimator={self.meta.get('estimator')!r})")


class FullFisher(dict):
    """Diagonal Fisher of every body parameter: ``{"body": tree}`` shaped like ``params["body"]``.

    A plain dict (what merges expect) with ``num_examples`` and ``meta`` attributes.
    """

    def __init__(self, body: Mapping[str, Any], num_examples: int = 0, meta: Optional[dict] = None):
        super().__init__(body=body)
        self.num_examples = int(num_examples)
        self.meta = dict(meta or {})

    def __repr__(self) -> str:
        return (f"FullFisher({len(tree.flatten(self['body']))} tensors, num_examples={self.num_examples}, "
                f"estimator={self.meta.get('estimator')!r})")


class Grams(dict):
    """RegMean Grams ``G = X^T X / #rows`` keyed by Dense body path (``encoder/layer/0/attention/self/query``).

    A flat dict (what ``fj.merge("regmean", grams=[...])`` expects); query, key and value map to the
    *same* array object. ``num_tokens`` counts the token rows every per-token layer saw,
    ``num_examples`` the examples (the BERT pooler's rows); ``aliases`` maps shared keys to the key
    that owns the array.
    """

    def __init__(self, grams: Mapping[str, np.ndarray], num_tokens: int = 0, num_examples: int = 0,
                 meta: Optional[dict] = None):
        super().__init__(grams)
        self.num_tokens = int(num_tokens)
        self.num_examples = int(num_examples)
        self.meta = dict(meta or {})

    @property
    def grams(self) -> dict[str, np.ndarray]:
        return dict(self)

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self.meta.get("aliases", {}))

    def __repr__(self) -> str:
        return f"Grams({len(self)} layers, num_tokens={self.num_tokens}, num_examples={self.num_examples})"


Stats = Union[MaskFisher, FullFisher, Grams]


def kind_of(stats: Any) -> str:
    if isinstance(stats, MaskFisher) or (hasattr(stats, "head") and hasattr(stats, "neuron")):
        return "mask_fisher"
    if isinstance(stats, Grams):
        return "gram"
    if isinstance(stats, Mapping) and "body" in stats:
        return "full_fisher"
    raise FisherJaxError(
        f"cannot tell what statistics a {type(stats).__name__} holds: expected a MaskFisher, a full Fisher "
        "({'body': tree}) or Grams"
    )


LOSSES = ("cross_entropy", "mse")


def loss_name(regression: bool) -> str:
    """The training loss a Fisher differentiates: ``"mse"`` for regression, else ``"cross_entropy"``."""
    return "mse" if regression else "cross_entropy"


def loss_of(meta: Mapping[str, Any]) -> Optional[str]:
    """A Fisher record's loss: ``meta["loss"]``, or for files written before it was recorded,
    inferred from the architecture's ``num_labels`` (1 = regression) or the task's registry entry;
    ``None`` when nothing says."""
    loss = meta.get("loss")
    if loss in LOSSES:
        return loss
    labels = (meta.get("arch") or {}).get("num_labels")
    if isinstance(labels, int) and labels > 0:
        return loss_name(labels == 1)
    task = meta.get("task")
    if task:
        from ..data.glue import get_task  # only files without `loss` or `arch` get here

        try:
            return loss_name(get_task(task).is_regression)
        except FisherJaxError:  # a custom task name the registry does not know
            return None
    return None



__all__ = ["ESTIMATORS", "FullFisher", "Grams", "KINDS", "LOSSES", "MaskFisher", "Stats", "check_estimator", "kind_of",
           "loss_name", "loss_of"]
