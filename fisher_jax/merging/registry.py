"""The merge-method registry: what each method needs and how its inputs are checked.

Every method is registered once, here, as a :class:`MergeMethod`: its pure function, the
statistics it takes (:class:`Statistic`: the base model, full or mask Fishers, Grams, batches),
what each one is, the keyword aliases it accepts, and a validator that checks and converts the
method's own inputs. :func:`fisher_jax.merging.merge` only walks these declarations; it never
branches on a method's name, so a new method is one ``register(...)`` call.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import jax.numpy as jnp

from ..errors import FisherJaxError
from ..tree import check_same_structure, did_you_mean, flatten

# Kinds of statistics; "full_fisher", "mask_fisher" and "gram" are also the names of the
# statistics sections (and files) that produce them.
BASE, FULL_FISHER, MASK_FISHER, GRAM, BATCHES = "base", "full_fisher", "mask_fisher", "gram", "batches"
STAT_KINDS = (BASE, FULL_FISHER, MASK_FISHER, GRAM, BATCHES)


@dataclasses.dataclass(frozen=True)
class Statistic:
    """One input a method needs besides the models: ``merge(..., <keyword>=...)``.

    ``param`` is the pure function's parameter when it differs from ``keyword`` (fisher_nodes
    takes ``mask_fishers`` but ``merge`` spells every Fisher ``fishers=``, SPEC §7); ``aliases``
    are further keywords ``merge`` accepts for it; ``noun`` names it in messages.
    """

    keyword: str
    kind: str
    description: str
    param: Optional[str] = None
    aliases: tuple[str, ...] = ()
    required: bool = True
    noun: str = ""

    @property
    def target(self) -> str:
        return self.param or self.keyword


@dataclasses.dataclass
class Context:
    """What a validator may look at: the method's name, the Models, their bodies, the merge report."""

    name: str
    models: Sequence[Any]
    bodies: Sequence[Mapping[str, Any]]
    report: Optional[dict]

    @property
    def arch(self) -> Any:
        return getattr(self.models[0], "arch", None) if self.models else None


Validator = Callable[[dict, Context], dict]


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    ``fn(inputs, **kw)``: ``inputs`` are the body trees (``inputs="bodies"``) or the Models
    themselves (``inputs="models"``, for methods that run the network, such as RegMean++).
    ``validate(kw, ctx) -> kw`` checks the method's own keywords once the statistics have been
    converted (bases to body trees, lists counted against the models).
    """

    name: str
    fn: Callable[..., Any]
    statistics: tuple[Statistic, ...] = ()
    validate: Optional[Validator] = None
    inputs: Literal["bodies", "models"] = "bodies"
    summary: str = ""
    shared: tuple[str, ...] = ()  # coefficients with one value for all models (slerp's t), never a list per model
    max_models: Optional[int] = None  # slerp interpolates exactly two models; None: any number

    def accepts(self, n_models: int) -> bool:
        """Whether the method merges ``n_models`` models (plans skip the subsets it cannot take)."""
        return self.max_models is None or n_models <= self.max_models

    def statistic(self, keyword: str) -> Optional[Statistic]:
        return next((s for s in self.statistics if keyword in (s.keyword, *s.aliases)), None)

    def keywords(self) -> list[str]:
        """``merge``'s keywords for this method: the function's parameters with statistics spelt as ``merge`` spells them."""
        rename = {s.target: s.keyword for s in self.statistics}
        params = list(inspect.signature(self.fn).parameters)[1:]
        return [rename.get(p, p) for p in params if p != "diagnostics"]

    @property
    def needs(self) -> tuple[str, ...]:
        """Kinds of the required statistics (``"base"``, ``"full_fisher"``, ``"mask_fisher"``, ``"gram"``, ``"batches"``)."""
        return tuple(s.kind for s in self.statistics if s.required)


REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add ``method`` to :data:`REGISTRY` (and so to ``fisher_jax.merging.METHODS``)."""
    for s in method.statistics:
        if s.kind not in STAT_KINDS:
            raise ValueError(f"{method.name}: unknown statistic kind {s.kind!r}")
    REGISTRY[method.name] = method
    return method


def canonical(method: str) -> str:
    """A method name as registered: lower case, dashes as underscores."""
    return str(method).strip().lower().replace("-", "_")


def lookup(method: str, methods: Mapping[str, Callable[..., Any]]) -> tuple[str, Callable[..., Any]]:
    """``(name, fn)`` for ``method`` in ``methods``; a one-line error with did-you-mean otherwise."""
    key = canonical(method)
    if key not in methods:
        raise FisherJaxError(
            f"unknown merge method '{method}'{did_you_mean(key, methods)}; choose from {', '.join(methods)}"
        )
    return key, methods[key]


def spec_for(name: str, fn: Callable[..., Any]) -> MergeMethod:
    """The registered declaration of ``name``, running ``fn`` (a replaced ``METHODS`` entry keeps it)."""
    spec = REGISTRY.get(name)
    if spec is None:
        return MergeMethod(name, fn)
    return spec if spec.fn is fn else dataclasses.replace(spec, fn=fn)


# ---------------------------------------------------------------------------- shared checks
def warn(report: Optional[dict], message: str) -> None:
    """A merge-time warning: issued with :func:`warnings.warn` and recorded in ``report["warnings"]``."""
    warnings.warn(message, stacklevel=3)
    if report is not None:
        report.setdefault("warnings", []).append(message)


def body_of(obj: Any, what: str) -> Mapping[str, Any]:
    """The body tree of a Model, a params dict ``{"body": ..., ...}`` or a bare body tree."""
    params = getattr(obj, "params", obj)
    if not isinstance(params, Mapping):
        raise FisherJaxError(f"{what} is a {type(obj).__name__}, not a model, a params dict or a body tree")
    body = params.get("body", params)
    if not isinstance(body, Mapping) or not body:
        raise FisherJaxError(f"{what} has no parameters under 'body'")
    return body


def check_finite(body: Mapping[str, Any], what: str) -> None:
    for name, leaf in flatten(body).items():
        if not bool(jnp.all(jnp.isfinite(jnp.asarray(leaf)))):
            raise FisherJaxError(f"{what} has NaN/inf values at '{name}'")


def check_count(stats: Any, keyword: str, n: int) -> list[Any]:
    """``stats`` as a list with one entry per model."""
    if isinstance(stats, (Mapping, str)) or not isinstance(stats, Sequence):
        raise FisherJaxError(f"{keyword}= must be a list with one entry per model ({n}), got {type(stats).__name__}")
    if len(stats) != n:
        raise FisherJaxError(f"{keyword}= has {len(stats)} entries for {n} models")
    return list(stats)


def _convert(stat: Statistic, value: Any, ctx: Context) -> Any:
    """The generic conversion of one statistic: a base to its body tree, a per-model list counted."""
    if stat.kind == BASE:
        base = body_of(value, stat.keyword)
        check_same_structure(ctx.bodies[0], base, what=f"model 0 and {stat.keyword} bodies")
        check_finite(base, stat.keyword)
        return base
    return check_count(value, stat.keyword, len(ctx.bodies))


def prepare(spec: MergeMethod, models: Sequence[Any], bodies: Sequence[Mapping[str, Any]], kw: Mapping[str, Any],
            report: Optional[dict] = None) -> dict:
    """Validate ``merge``'s keywords against ``spec`` and turn them into the pure function's keywords.

    Aliases are resolved, unknown keywords refused with a did-you-mean, missing statistics named
    with what to pass, each statistic converted (:func:`_convert`), then the method's validator runs.
    """
    kw = dict(kw)
    for stat in spec.statistics:
        given = [k for k in (stat.keyword, *stat.aliases) if k in kw]
        if len(given) > 1:
            raise FisherJaxError(f"pass {stat.noun or stat.keyword} as {' or '.join(k + '=' for k in given)}, not both")
        if given and given[0] != stat.keyword:
            kw[stat.keyword] = kw.pop(given[0])
    accepted = spec.keywords()
    for key in kw:
        if key not in accepted:
            raise FisherJaxError(
                f"merge method '{spec.name}' takes no keyword '{key}'{did_you_mean(key, accepted)}; "
                f"it accepts: {', '.join(accepted) or 'nothing'}"
            )
    for stat in spec.statistics:
        if stat.required and kw.get(stat.keyword) is None:
            raise FisherJaxError(f"merge method '{spec.name}' needs {stat.keyword}=: {stat.description}")
    ctx = Context(spec.name, models, bodies, report)
    for stat in spec.statistics:
        if kw.get(stat.keyword) is not None:
            kw[stat.keyword] = _convert(stat, kw[stat.keyword], ctx)
    if spec.validate is not None:
        kw = spec.validate(kw, ctx)
    for stat in spec.statistics:
        if stat.target != stat.keyword and stat.keyword in kw:
            kw[stat.target] = kw.pop(stat.keyword)
    return kw


__all__ = [
    "BASE", "BATCHES", "FULL_FISHER", "GRAM", "MASK_FISHER", "REGISTRY", "STAT_KINDS", "Context", "MergeMethod",
    "Statistic", "body_of", "canonical", "check_count", "check_finite", "lookup", "prepare", "register", "spec_for",
    "warn",
]
