"""`mlx-transformer train`: pretraining and fine-tuning (full or LoRA), single or data-parallel.

    mlx-transformer train --data DATA --out RUN [--max-steps N] [--resume]
                          [--init-from CKPT_OR_HF_DIR] [--lora --lora-rank 8 ...]

The loop: a compiled step (train_step.Stepper) per optimizer step, evaluation every
`eval_every` steps on a fixed validation sample (loss, perplexity, bits per byte), metrics to
OUT/metrics.jsonl and OUT/loss.png, checkpoints every `save_every` steps and at the end
(run_folder.RunFolder). Ctrl-C or SIGTERM finish the current step, save, and exit with 130 / 143.
A NaN or infinite loss stops the run, and so do weights that are not finite, or give a
non-finite loss, when a checkpoint is due: nothing is saved and `latest` stays on the last good
checkpoint. One `train` per run folder at a time (run_lock.RunLock); a step that cannot fit in
memory is refused before anything is allocated. The model is built in model_setup, evaluated
in evaluate, checked and saved in checkpointing.

Randomness is a pure function of (seed, rank, step): batch k comes from data.PretrainBatches,
and the MLX key (dropout, LoRA init) is reseeded from (seed, rank, step) before each step, so
`--resume` replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..cpu.blas import cores
from ..cpu.training import default_streams, training_environment
from ..data.batches import FinetuneBatches, PretrainBatches
from ..data.dataset import Dataset, load_dataset
from ..errors import UserError
from ..generate.decode import device_memory_available
from . import args as train_args
from .args import TrainingArgs
from .checkpointing import Checkpointing, TrainingDiverged
from .evaluate import (
    evaluate,
    evaluate_checkpoint,  # noqa: F401  re-exported: demo and scripts import it from here
    val_bytes_per_token,
    validation_batches,
)
from .metrics import MetricsLog, Plotter, StepWindow, progress_bar
from .model_setup import build_model
from .run_folder import (
    RunFolder,
    read_training_state,
    restore_optimizer,
)
from .signals import EXIT_CODES, StopRequest
from .step import (
    Stepper,
    check_step_memory,
    make_optimizer,
    to_mx,
)


@dataclass
class TrainResult:
    """What `train` returns."""

    step: int
    stopped_by: str  # "completed", "SIGINT" or "SIGTERM"
    train_loss: float | None
    val: dict[str, float] | None
    checkpoint: Path | None  # OUT/latest resolved (None on ranks > 0)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.stopped_by]


# -- data ---------------------------------------------------------------------------------------


def make_batches(args: TrainingArgs, dataset: Dataset, context: int, rank: int, world: int):
    cls = PretrainBatches if dataset.kind == "pretrain" else FinetuneBatches
    return cls(dataset, args.batch_size, context, seed=args.seed, rank=rank, world_size=world)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The MLX random key of a step: a pure function of (seed, rank, step)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0])


# -- the loop -----------------------------------------------------------------------------------


class Trainer(Checkpointing):
    """One training run; `train()` is the usual way in."""

    def __init__(self, args: TrainingArgs):
        args.validate()
        self.args = args
        self.group = mx.distributed.init() if mx.distributed.is_available() else None
        self.rank = self.group.rank() if self.group is not None else 0
        self.world = self.group.size() if self.group is not None else 1
        if self.group is not None and self.world == 1:
            self.group = None
        # More streams than rows would leave some idle (shards() never makes empty ones).
        self.streams = min(args.streams or default_streams(cores()), args.batch_size)
        self.run = RunFolder(args.out)
        self.dataset = load_dataset(args.data)
        if self.rank == 0:  # the only writer; held until close()
            note = self.run.lock.acquire()
            if note:
                print(note, file=sys.stderr)
        try:
            if self.rank == 0:
                with self.run.writing("the run folder"):
                    self.run.remove_stale_temporaries()
            self._setup()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder."""
        self.run.lock.release()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _setup(self) -> None:
        args, run = self.args, self.run
        resume_from, state, opt_tensors = None, {}, None
        if args.resume:
            resume_from = run.resume_point()
            state, opt_tensors = read_training_state(resume_from)
        elif run.has_run():
            raise UserError(
                f"{run.out} already holds a run; pass --resume to continue it, or choose "
                "another --out (nothing was overwritten)"
            )
        mx.random.seed(args.seed)  # model initialisation (and LoRA's A matrices)
        self.model, self.lora_config, self.tokenizer_path = build_model(
            args, self.dataset, resume_from
        )
        config = self.model.config
        self.context = args.context_length or config.max_position_embeddings
        if self.context > config.max_position_embeddings:
            raise UserError(
                f"--context-length {self.context} exceeds the model's context of "
                f"{config.max_position_embeddings} (max_position_embeddings)"
            )
        self._check_memory()
        self.model.train()
        self.optimizer = make_optimizer(args, self.model.trainable_parameters())
        if opt_tensors is not None:
            restore_optimizer(self.optimizer, opt_tensors, self.model.trainable_parameters())
        self.batches = make_batches(args, self.dataset, self.context, self.rank, self.world)
        if state:
            try:
                self.batches.load_state_dict(state["data"])
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(
                    f"{resume_from}/training_state/state.json: its data position is damaged "
                    f"({type(e).__name__}: {e}); point the run's `latest` at an earlier step"
                ) from None
        self.step = state.get("step", 0)
        self._dispatched, self._inflight, self.last_lr = self.step, None, math.nan
        self.tokens_seen = state.get("tokens_seen", 0)
        best = state.get("best_val_loss")
        self.best_val = math.inf if best is None else best
        self.stepper = Stepper(
            self.model,
            self.optimizer,
            args.precision,
            args.grad_clip,
            args.compile,
            self.group,
            streams=self.streams,
        )
        self.val_batches = validation_batches(
            self.dataset, args.batch_size, self.context, args.eval_batches
        )
        self.bytes_per_token = val_bytes_per_token(self.dataset)
        self._probe: tuple | None = None  # the batch a checkpoint's weights are tried on
        resolved = {**args.to_dict(), "streams": self.streams}
        # The settings `--resume` reuses: a resumed run's replace the saved ones only with its
        # first checkpoint, so a resume that fails at once leaves the run's settings as they were.
        self._run_config = {"training": resolved, "model": config.to_dict()}
        if self.rank == 0:
            if not args.resume:
                run.write_run_config(self._run_config)
                self._run_config = None
            with run.writing(run.metrics.name):
                self.metrics = MetricsLog(run.metrics, self.step if args.resume else None)
        self.plotter = Plotter(run.plot)

    def _check_memory(self) -> None:
        """Refuse a micro-batch that cannot fit, before anything of its size is allocated."""
        args, config = self.args, self.model.config
        length = self.context
        if self.dataset.kind == "finetune":  # batches are as long as their longest example
            examples = self.dataset.splits["train"].examples
            if len(examples):
                length = min(length, max(1, int(examples[:, 3].max()) - 1))
        trainable = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        check_step_memory(
            config, args.batch_size, length, args.precision, trainable, device_memory_available()
        )

    # -- one step ---------------------------------------------------------------------------

    def _dispatch(self) -> tuple[mx.array, mx.array, mx.array]:
        """Build the next step's graph and start computing it: (loss, norm, lr), all lazy."""
        mx.random.seed(step_seed(self.args.seed, self.rank, self._dispatched))
        acc = None
        for _ in range(self.args.grad_accumulation - 1):
            acc = self.stepper.accumulate(to_mx(next(self.batches)), acc)
            mx.eval(acc)  # bounds memory to one micro-batch's activations
        loss, norm = self.stepper.step(to_mx(next(self.batches)), acc)
        lr = self.optimizer.learning_rate  # this step's rate; the next step replaces the entry
        mx.async_eval(self.stepper.state, loss, norm)
        self._dispatched += 1
        return loss, norm, lr

    def train_step(self, prefetch: bool = False) -> tuple[float, float]:
        """One optimizer step over grad_accumulation micro-batches: (loss, grad norm).

        prefetch: before waiting for this step, build and start the next one, so that its graph
        is built while this one computes (~6% of a small model's step). The caller must not read
        the model or optimizer before the next call (no evaluation, saving or hooks in between).
        """
        current = self._inflight or self._dispatch()
        self._inflight = None
        if prefetch and self._dispatched < self.args.max_steps:
            self._inflight = self._dispatch()
        loss, norm, lr = current
        mx.eval(loss, norm)
        self.step += 1
        self.tokens_seen += (
            self.args.batch_size * self.context * self.world * (self.args.grad_accumulation)
        )
        self.last_lr = lr.item()
        loss_value, norm_value = loss.item(), norm.item()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            raise TrainingDiverged(
                f"loss {loss_value} (gradient norm {norm_value}) at step {self.step}: stopped "
                f"without saving; last good checkpoint: {self._last_good()} (lower "
                "--learning-rate, raise --warmup-steps, set --grad-clip or use float32)"
            )
        return loss_value, norm_value

    def _reads_state_after(self, step: int) -> bool:
        """Whether the loop evaluates or saves after `step`: the next step must wait until then."""
        a = self.args
        return (
            step >= a.max_steps
            or bool(a.eval_every and step % a.eval_every == 0)
            or bool(a.save_every and step % a.save_every == 0)
        )

    # -- the loop ---------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.val_batches, self.bytes_per_token, self.group)

    def should_stop(self, stop: StopRequest) -> bool:
        flag = stop.signal is not None
        if self.world > 1:  # every process must stop at the same step
            flag = mx.distributed.all_sum(mx.array(int(flag)), group=self.group).item() > 0
            if flag and stop.signal is None:
                stop.signal = "SIGTERM"
        return flag

    def fit(self, on_step=None) -> TrainResult:
        """Train to args.max_steps (or a stop signal). on_step(trainer, loss) after each step."""
        bar = progress_bar(self.args, self.rank, self.step)
        self.last_val, loss, window = None, None, StepWindow()
        try:
            with StopRequest() as stop, bar:
                # Hooks and gradient accumulation (which evaluates between micro-batches) run
                # one step at a time; otherwise the next step is built while this one computes.
                pipelined = on_step is None and self.args.grad_accumulation == 1
                while self.step < self.args.max_steps:
                    tic = time.perf_counter()
                    prefetch = pipelined and not self._reads_state_after(self.step + 1)
                    loss, norm = self.train_step(prefetch)
                    window.add(loss, norm, time.perf_counter() - tic)
                    if on_step is not None:
                        on_step(self, loss)
                    if self._after_step(stop, bar, window):
                        break
        finally:
            self.plotter.close()
        if self.rank == 0:
            with self.run.writing(self.run.plot.name):
                self.plotter.raise_error()
        checkpoint = self.run.latest.resolve() if self.rank == 0 else None
        loss = window.last_loss if loss is not None else None  # a stop may finish one more step
        return TrainResult(self.step, stop.signal or "completed", loss, self.last_val, checkpoint)

    def _after_step(self, stop: StopRequest, bar, window: StepWindow) -> bool:
        """Log, evaluate, save as the schedule says; True when a signal asks to stop."""
        args = self.args
        stopping = self.should_stop(stop)
        if stopping and self._inflight is not None:  # save a whole step: finish the one started
            self._log(bar, window)
            tic = time.perf_counter()
            loss, norm = self.train_step()
            window.add(loss, norm, time.perf_counter() - tic)
        final = self.step == args.max_steps
        self._log(bar, window)
        as_best, val_loss = False, None
        if (args.eval_every and self.step % args.eval_every == 0) or final:
            self.last_val = self._eval_and_log(bar)
            val_loss = self.last_val["val_loss"] if self.last_val is not None else None
            as_best = val_loss is not None and val_loss < self.best_val
            if as_best:
                self.best_val = val_loss
        periodic = args.save_every and self.step % args.save_every == 0
        self.save(bool(periodic) or final or stopping, as_best, val_loss)
        if stopping:
            bar.write(
                f"{stop.signal}: saved step {self.step} to {self.run.latest}", file=sys.stderr
            )
        return stopping

    def _log(self, bar, window: StepWindow) -> None:
        lr = self.last_lr  # the rate of the step just taken
        tok_s = window.tokens_per_sec(self.tokens_per_step)
        peak = mx.get_peak_memory() / 1e9
        bar.set_postfix_str(
            f"loss {window.last_loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s mem {peak:.2f} GB",
            refresh=False,
        )
        bar.update(1)
        if self.rank == 0 and self.args.log_every and self.step % self.args.log_every == 0:
            with self.run.writing(self.run.metrics.name):
                self.metrics.append(
                    {
                        "step": self.step,
                        "loss": window.mean_loss(),
                        "grad_norm": window.last_norm,
                        "lr": lr,
                        "tokens_per_sec": tok_s,
                        "tokens_seen": self.tokens_seen,
                        "peak_memory_gb": peak,
                    }
                )
            window.reset()

    @property
    def tokens_per_step(self) -> int:
        return self.args.batch_size * self.context * self.args.grad_accumulation * self.world

    def _eval_and_log(self, bar) -> dict[str, float] | None:
        if not self.val_batches:
            return None
        tic = time.perf_counter()
        val = self.evaluate()
        if self.rank == 0:
            seconds = time.perf_counter() - tic
            with self.run.writing(self.run.metrics.name):
                self.metrics.append({"step": self.step, **val, "eval_seconds": seconds})
            with self.run.writing(self.run.plot.name):
                self.plotter.submit(self.metrics.records)
            bar.write(
                f"step {self.step}: val loss {val['val_loss']:.4f}, ppl {val['val_ppl']:.2f}, "
                f"{val['val_bpb']:.4f} bits/byte",
                file=sys.stderr,
            )
        return val


def train(args: TrainingArgs, on_step=None) -> TrainResult:
    """Train as `args` says; see the module docstring.

    Args:
        args: the resolved settings (`train_args.resolve` builds them from flags and files).
        on_step: optional callable(trainer, loss) run after every step (tests, custom logging).
    Returns:
        A TrainResult; `exit_code` is 0, or 130 / 143 when stopped by SIGINT / SIGTERM.
    Raises:
        TrainingDiverged: the loss or the weights became NaN or infinite (nothing saved after
            the last good checkpoint); UserError for bad settings or data, a run folder another
            `train` is using, a step too large for memory, or a disk that refuses the writes.
    """
    with Trainer(args) as trainer, training_environment(trainer.streams):
        return trainer.fit(on_step)


# -- CLI ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    train_args.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    result = train(train_args.resolve(args))
    if result.checkpoint is not None:
        val = result.val or {}
        detail = f", val loss {val['val_loss']:.4f}" if "val_loss" in val else ""
        print(f"step {result.step}{detail}; checkpoint: {result.checkpoint}", file=sys.stderr)
    return result.exit_code
