"""ExperimentConfig: one frozen record for the paper's protocol, read from YAML.

```yaml
name: minilm_zoo
base: minilm                      # pre-trained body: folder, Hub id, or "minilm" (the pip package)
tasks: {rte: ~/.cache/fisher_jax/zoo/minilm/rte, mrpc: ...}   # fine-tuned checkpoints
methods: [simple, task_arithmetic, ties, dare, fisher, fisher_nodes, fisher_nodes_node, regmean]
method_kwargs: {ties: {density: 0.2, lam: 1.0}}               # optional overrides per method label
mask_fisher: {estimator: batch, num_examples: 128, batch_size: 32}
full_fisher: {estimator: expected, num_examples: 256, batch_size: 8}
gram: {num_examples: 256, batch_size: 32}
pairs: true                       # every pair of tasks
all_tasks: true                   # and the merge of all tasks
max_eval_examples: null           # cap dev rows per task (null: the whole dev split)
search: {held_out: 256, grid: {task_arithmetic: {lam: [0.3, 0.5, 0.7, 1.0]}}}   # optional
output_dir: benchmarks/results/zoo_experiment
```
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from ..errors import FisherJaxError

def cache_root() -> Path:
    """``$FISHER_JAX_CACHE`` (read at call time, so a notebook may set it late), else ~/.cache/fisher_jax."""
    return Path(os.environ.get("FISHER_JAX_CACHE", Path.home() / ".cache" / "fisher_jax")).expanduser()


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A table column: ``label`` (e.g. "fisher_nodes_node") = ``method`` with ``kwargs``."""

    label: str
    method: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def needs(self) -> Optional[str]:
        return {"fisher": "full_fisher", "fisher_nodes": "mask_fisher", "regmean": "gram"}.get(self.method)

    @property
    def needs_base(self) -> bool:
        return self.method in ("task_arithmetic", "ties", "dare")


# Labels a config may use without spelling out the method and its defaults.
DEFAULT_METHODS: dict[str, MethodSpec] = {
    "simple": MethodSpec("simple", "simple"),
    "task_arithmetic": MethodSpec("task_arithmetic", "task_arithmetic", (("lam", 0.5),)),
    "ties": MethodSpec("ties", "ties", (("density", 0.2), ("lam", 1.0))),
    "dare": MethodSpec("dare", "dare", (("drop_rate", 0.5), ("lam", 0.5), ("seed", 0))),
    "fisher": MethodSpec("fisher", "fisher", ()),
    "fisher_nodes": MethodSpec("fisher_nodes", "fisher_nodes", (("mapping", "reference"),)),
    "fisher_nodes_node": MethodSpec("fisher_nodes_node", "fisher_nodes", (("mapping", "node"),)),
    "regmean": MethodSpec("regmean", "regmean", (("alpha", 1.0),)),
}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str
    tasks: tuple[tuple[str, str], ...]  # (task, checkpoint) in table order
    base: Optional[str] = None
    methods: tuple[MethodSpec, ...] = tuple(DEFAULT_METHODS.values())
    glue_dir: Optional[str] = None
    output_dir: str = "experiment_out"
    cache_dir: str = dataclasses.field(default_factory=lambda: str(cache_root() / "stats"))
    mask_fisher: tuple[tuple[str, Any], ...] = (("estimator", "batch"), ("num_examples", 128), ("batch_size", 32))
    full_fisher: tuple[tuple[str, Any], ...] = (("estimator", "expected"), ("num_examples", 256), ("batch_size", 8))
    gram: tuple[tuple[str, Any], ...] = (("num_examples", 256), ("batch_size", 32))
    pairs: bool = True
    all_tasks: bool = True
    max_eval_examples: Optional[int] = None
    eval_batch_size: int = 64
    search: tuple[tuple[str, Any], ...] = ()
    seed: int = 0

    @property
    def task_names(self) -> list[str]:
        return [t for t, _ in self.tasks]

    def section(self, name: str) -> dict[str, Any]:
        return dict(getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "tasks": dict(self.tasks), "base": self.base,
            "methods": [{"label": m.label, "method": m.method, **dict(m.kwargs)} for m in self.methods],
            "glue_dir": self.glue_dir, "output_dir": self.output_dir, "mask_fisher": dict(self.mask_fisher),
            "full_fisher": dict(self.full_fisher), "gram": dict(self.gram), "pairs": self.pairs,
            "all_tasks": self.all_tasks, "max_eval_examples": self.max_eval_examples,
            "search": _thaw(self.search), "seed": self.seed,
        }


def _freeze(d: Mapping[str, Any]) -> tuple:
    return tuple((k, _freeze(v) if isinstance(v, Mapping) else tuple(v) if isinstance(v, list) else v)
                 for k, v in d.items())


def _thaw(t: Any) -> Any:
    if isinstance(t, tuple) and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in t):
        return {k: _thaw(v) for k, v in t}
    return list(t) if isinstance(t, tuple) else t


def _methods(raw: Any, overrides: Mapping[str, Any]) -> tuple[MethodSpec, ...]:
    from ..tree import did_you_mean

    specs = []
    for item in raw or list(DEFAULT_METHODS):
        if isinstance(item, str):
            if item not in DEFAULT_METHODS:
                raise FisherJaxError(f"unknown method '{item}'{did_you_mean(item, DEFAULT_METHODS)}; "
                                     f"known: {', '.join(DEFAULT_METHODS)}")
            spec = DEFAULT_METHODS[item]
        elif isinstance(item, Mapping) and "method" in item:
            kw = {k: v for k, v in item.items() if k not in ("label", "method")}
            spec = MethodSpec(str(item.get("label", item["method"])), str(item["method"]), tuple(kw.items()))
        else:
            raise FisherJaxError(f"a method entry must be a name or a mapping with 'method', got {item!r}")
        if spec.label in overrides:
            spec = dataclasses.replace(spec, kwargs=tuple({**dict(spec.kwargs), **overrides[spec.label]}.items()))
        specs.append(spec)
    return tuple(specs)


def from_dict(raw: Mapping[str, Any], where: str = "config") -> ExperimentConfig:
    known = {f.name for f in dataclasses.fields(ExperimentConfig)} | {"method_kwargs"}
    unknown = sorted(set(raw) - known)
    if unknown:
        from ..tree import did_you_mean

        raise FisherJaxError(f"{where}: unknown key '{unknown[0]}'{did_you_mean(unknown[0], known)}")
    tasks = raw.get("tasks")
    if not isinstance(tasks, Mapping) or len(tasks) < 2:
        raise FisherJaxError(f"{where}: 'tasks' must map at least two task names to checkpoints")
    from ..data.glue import get_task

    for task in tasks:
        get_task(task)  # unknown task names fail here, listing the known ones
    kw: dict[str, Any] = {k: raw[k] for k in ("name", "base", "glue_dir", "output_dir", "cache_dir", "pairs",
                                             "all_tasks", "max_eval_examples", "eval_batch_size", "seed")
                          if raw.get(k) is not None}
    kw.setdefault("name", Path(where).stem)
    for section in ("mask_fisher", "full_fisher", "gram"):
        if raw.get(section):
            default = dict(getattr(ExperimentConfig, section))
            kw[section] = tuple({**default, **raw[section]}.items())
    if raw.get("search"):
        kw["search"] = _freeze(raw["search"])
    kw["tasks"] = tuple((get_task(t).name, str(p)) for t, p in tasks.items())
    kw["methods"] = _methods(raw.get("methods"), raw.get("method_kwargs") or {})
    return ExperimentConfig(**kw)


def load_config(path: str | os.PathLike) -> ExperimentConfig:
    import yaml

    p = Path(path)
    packaged = Path(__file__).resolve().parents[1] / "configs" / f"{p.stem}.yaml"
    if not p.is_file() and packaged.is_file() and p.name in (p.stem, packaged.name):
        p = packaged  # a packaged config by name: "minilm_zoo" or "minilm_zoo.yaml"
    if not p.is_file():
        known = ", ".join(sorted(x.stem for x in packaged.parent.glob("*.yaml")))
        raise FisherJaxError(f"experiment config '{p}' does not exist (packaged configs: {known})")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise FisherJaxError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, Mapping):
        raise FisherJaxError(f"{p}: expected a mapping at the top level")
    # Relative output_dir is relative to the working directory, as for every other CLI path.
    return from_dict(raw, str(p))
