"""What a training run saves, and the check that keeps a diverged run from saving.

`Checkpointing` is the part of `trainer.Trainer` that writes checkpoints: the training state a
`--resume` reads back, step and best checkpoints (rank 0 writes), and the finiteness check every
rank runs before a save. It uses the trainer's model, optimizer, batches, run folder and step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import UserError
from .run_folder import write_checkpoint
from .step import loss_sum, to_mx


class TrainingDiverged(UserError):
    """The loss or gradient norm became NaN or infinite, or the weights due to be saved did."""


class Checkpointing:
    """Saving for `trainer.Trainer` (a mixin: the attributes it reads are set by Trainer)."""

    def training_state(self) -> dict[str, Any]:
        return {
            "format_version": 1,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
            "seed": self.args.seed,
            "data": self.batches.state_dict(),
            "world_size": self.world,
            "precision": self.args.precision,
            "lora": self.lora_config is not None,
            "mlx_version": mx.__version__,
        }

    def save(self, as_step: bool, as_best: bool, val_loss: float | None = None) -> None:
        """Write checkpoints/step_N (and point latest at it) and/or best/; rank 0 writes.

        Only weights that pass `check_finite` are written (every rank checks: they all stop
        together); val_loss: this step's validation loss, if one was just measured.
        """
        if not (as_step or as_best):
            return
        self.check_finite(val_loss)
        if self.rank != 0:
            return
        state = self.training_state()
        parts = (self.model, self.optimizer, state, self.tokenizer_path, self.lora_config)
        if as_step:
            folder = self.run.save(self.step, *parts, keep_last=self.args.keep_last)
            if self._run_config is not None:
                self.run.write_run_config(self._run_config)
                self._run_config = None
            if as_best:
                self.run.save_best(folder)
        else:
            with self.run.writing("best/"):
                write_checkpoint(self.run.best, *parts)

    def check_finite(self, val_loss: float | None = None) -> None:
        """Raise TrainingDiverged unless the weights and optimizer state are finite and the
        model's loss on a fixed batch is too. A step's own loss is measured before its update,
        so an update that blows the weights up (finite, 1e29) shows only in the next loss: this
        measures it now, with one forward pass per save (none when val_loss was just measured).
        """
        leaves = [v for _, v in tree_flatten(self.model.parameters())]
        leaves += [
            v
            for _, v in tree_flatten(self.optimizer.state)
            if isinstance(v, mx.array) and mx.issubdtype(v.dtype, mx.floating)
        ]
        finite = mx.stack([mx.isfinite(v).all() for v in leaves]).all()
        loss = self._probe_loss() if val_loss is None else mx.array(val_loss)
        mx.eval(finite, loss)
        if finite.item() and math.isfinite(loss.item()):
            return
        what = "are not finite" if not finite.item() else f"give loss {loss.item()}"
        raise TrainingDiverged(
            f"after step {self.step} the weights {what}: stopped without saving; last good "
            f"checkpoint: {self._last_good()} (lower --learning-rate, raise --warmup-steps, "
            "set --grad-clip or use float32)"
        )

    def _probe_loss(self) -> mx.array:
        """Mean loss of the current weights on a fixed batch (the first validation batch, or
        the first training batch), without dropout; lazy."""
        if self._probe is None:
            batch = self.val_batches[0] if self.val_batches else self.batches.batch(0)
            self._probe = to_mx(batch)
        was_training = self.model.training
        self.model.eval()
        total, count = loss_sum(self.model, self._probe)
        self.model.train(was_training)
        return total / mx.maximum(count, 1)

    def _last_good(self) -> Path | str:
        return self.run.latest.resolve() if self.run.latest.exists() else "none yet"
