"""Pictures of a mask Fisher: which heads and layers the task leans on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np


def _positive_floor(*arrays: np.ndarray) -> float:
    """Smallest positive value (zeros are drawn there on a log scale)."""
    pos = np.concatenate([a[a > 0].ravel() for a in arrays]) if arrays else np.array([])
    return float(pos.min()) if pos.size else 1e-12


def plot_mask_fisher(mf: Any, path: Union[str, os.PathLike], title: Optional[str] = None) -> Path:
    """PNG: head Fisher heatmap ``[L, H]`` (log colours, layer 0 at the top) + neuron Fisher per layer.

    Right panel: one box per layer of the ``I`` neuron Fishers (log scale; whiskers 5-95 %).
    Zeros are drawn at the smallest positive value. Returns the path written.
    """
    # The object-oriented Figure API: no pyplot, so a notebook's inline backend is left alone.
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    head = np.asarray(mf.head, np.float64)
    neuron = np.asarray(mf.neuron, np.float64)
    floor = _positive_floor(head, neuron)
    L, H = head.shape
    fig = Figure(figsize=(4 + 0.45 * H + 0.5 * L, 1.5 + 0.42 * L))
    ax_h, ax_n = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(H, 4), max(L, 4)]})
    hv = np.maximum(head, floor)
    im = ax_h.imshow(hv, norm=LogNorm(vmin=hv.min(), vmax=max(hv.max(), hv.min() * 10)), cmap="viridis",
                     aspect="auto", interpolation="nearest")
    ax_h.set_xlabel("head")
    ax_h.set_ylabel("layer")
    ax_h.set_xticks(range(H))
    ax_h.set_yticks(range(L))
    ax_h.set_title("head-mask Fisher")
    fig.colorbar(im, ax=ax_h, fraction=0.046, pad=0.04)

    ax_n.boxplot([np.maximum(neuron[l], floor) for l in range(L)], positions=range(L), whis=(5, 95),
                 showfliers=True, flierprops={"markersize": 2, "alpha": 0.4})
    ax_n.set_yscale("log")
    ax_n.set_xlabel("layer")
    ax_n.set_ylabel("Fisher")
    ax_n.set_title(f"neuron-mask Fisher ({neuron.shape[1]} per layer)")
    meta = getattr(mf, "meta", {}) or {}
    sup = title or " · ".join(str(x) for x in (meta.get("task"), meta.get("estimator"),
                                                f"{getattr(mf, 'num_examples', '?')} examples") if x)
    fig.suptitle(sup)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


__all__ = ["plot_mask_fisher"]
