"""Resumable statistics passes: the running sums saved with orbax every few batches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .. import tree
from ..errors import FisherJaxError


class Checkpointer:
    """Running sums of a long statistics pass, saved with orbax every ``every`` batches.

    The directory holds one checkpoint (the latest): the sums (numpy) plus JSON with the number of
    batches consumed and a ``run`` record (kind, estimator, seed, model fingerprint). Resuming
    with a different ``run`` record is refused rather than silently mixing two runs.
    """

    def __init__(self, directory: Union[str, os.PathLike], run: Mapping[str, Any], every: int = 50):
        import orbax.checkpoint as ocp

        if every < 1:
            raise FisherJaxError(f"checkpoint_every must be >= 1, got {every}")
        self._ocp = ocp
        self.directory = Path(directory).expanduser().absolute()
        self.run = tree.jsonable(dict(run))
        self.every = int(every)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True),
        )

    def restore(self, template: Any) -> Optional[tuple[Any, int]]:
        """``(sums, batches_consumed)`` of the latest checkpoint, or ``None`` when there is none."""
        step = self._manager.latest_step()
        if step is None:
            return None
        ocp = self._ocp
        try:
            got = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore())
            )
        except Exception as e:
            raise FisherJaxError(f"cannot resume from checkpoint '{self.directory}' (step {step}): {e}") from None
        if got.meta.get("run") != self.run:
            raise FisherJaxError(
                f"checkpoint_dir '{self.directory}' holds another run ({got.meta.get('run')}), not {self.run}: "
                "use a fresh directory"
            )
        return got.state, int(got.meta["batches"])

    def save(self, state: Any, batches: int) -> None:
        ocp = self._ocp
        self._manager.save(
            batches,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave({"run": self.run, "batches": int(batches)})),
            force=True,
        )
        self._manager.wait_until_finished()


__all__ = ["Checkpointer"]
