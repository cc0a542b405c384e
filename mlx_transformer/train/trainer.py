"""`mlx-transformer train`: pretraining and fine-tuning (full or LoRA), single or data-parallel.

    mlx-transformer train --data DATA --out RUN [--max-steps N] [--resume]
                          [--init-from CKPT_OR_HF_DIR] [--lora --lora-rank 8 ...]

The loop: a compiled step (train_step.Stepper) per optimizer step, evaluation every
`eval_every` steps on a fixed validation sample (loss, perplexity, bits per byte), metrics to
OUT/metrics.jsonl and OUT/loss.png, checkpoints every `save_every` steps and at the end
(train_io.RunFolder). Ctrl-C or SIGTERM finish the current step, save, and exit with 130 / 143.
A NaN or infinite loss stops the run before anything is saved over the last good checkpoint.
The model is built in train_model, evaluated in train_eval.

Randomness is a pure function of (seed, rank, step): batch k comes from data.PretrainBatches,
and the MLX key (dropout, LoRA init) is reseeded from (seed, rank, step) before each step, so
`--resume` replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..cpu.blas import cores
from ..cpu.training import default_streams, training_environment
from ..data.dataset import Dataset, FinetuneBatches, PretrainBatches, load_dataset
from ..errors import UserError
from . import args as train_args
from .args import TrainingArgs
from .evaluate import (
    evaluate,
    evaluate_checkpoint,  # noqa: F401  re-exported: demo and scripts import it from here
    val_bytes_per_token,
    validation_batches,
)
from .model_setup import build_model
from .run_folder import (
    MetricsLog,
    Plotter,
    RunFolder,
    read_training_state,
    restore_optimizer,
    write_checkpoint,
)
from .step import Stepper, make_optimizer, to_mx

EXIT_CODES = {"completed": 0, "SIGINT": 130, "SIGTERM": 143}


class TrainingDiverged(UserError):
    """The loss or gradient norm became NaN or infinite."""


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


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits. A second
    signal gets the default behaviour (KeyboardInterrupt / termination)."""

    def __init__(self):
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Trainer:
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
        self._setup()

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
        self.model.train()
        self.optimizer = make_optimizer(args, self.model.trainable_parameters())
        if opt_tensors is not None:
            restore_optimizer(self.optimizer, opt_tensors, self.model.trainable_parameters())
        self.batches = make_batches(args, self.dataset, self.context, self.rank, self.world)
        if state:
            self.batches.load_state_dict(state["data"])
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
        if self.rank == 0:
            resolved = {**args.to_dict(), "streams": self.streams}
            run.write_run_config({"training": resolved, "model": config.to_dict()})
            self.metrics = MetricsLog(run.metrics, self.step if args.resume else None)
        self.plotter = Plotter(run.plot)

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
            last = self.run.latest.resolve() if self.run.latest.exists() else None
            raise TrainingDiverged(
                f"loss {loss_value} (gradient norm {norm_value}) at step {self.step}: stopped "
                f"without saving; last good checkpoint: {last or 'none yet'} (lower "
                "--learning-rate, raise --warmup-steps or use float32)"
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

    # -- saving -----------------------------------------------------------------------------

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

    def save(self, as_step: bool, as_best: bool) -> None:
        """Write checkpoints/step_N (and point latest at it) and/or best/; rank 0 only."""
        if self.rank != 0 or not (as_step or as_best):
            return
        state = self.training_state()
        parts = (self.model, self.optimizer, state, self.tokenizer_path, self.lora_config)
        if as_step:
            folder = self.run.save(self.step, *parts, keep_last=self.args.keep_last)
            if as_best:
                self.run.save_best(folder)
        else:
            write_checkpoint(self.run.best, *parts)

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
        bar = _progress(self.args, self.rank, self.step)
        self.last_val, loss, window = None, None, _Window()
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
        checkpoint = self.run.latest.resolve() if self.rank == 0 else None
        loss = window.last_loss if loss is not None else None  # a stop may finish one more step
        return TrainResult(self.step, stop.signal or "completed", loss, self.last_val, checkpoint)

    def _after_step(self, stop: StopRequest, bar, window: _Window) -> bool:
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
        as_best = False
        if (args.eval_every and self.step % args.eval_every == 0) or final:
            self.last_val = self._eval_and_log(bar)
            as_best = self.last_val is not None and self.last_val["val_loss"] < self.best_val
            if as_best:
                self.best_val = self.last_val["val_loss"]
        periodic = args.save_every and self.step % args.save_every == 0
        self.save(bool(periodic) or final or stopping, as_best)
        if stopping:
            bar.write(
                f"{stop.signal}: saved step {self.step} to {self.run.latest}", file=sys.stderr
            )
        return stopping

    def _log(self, bar, window: _Window) -> None:
        lr = self.last_lr  # the rate of the step just taken
        tok_s = window.tokens_per_sec(self.tokens_per_step)
        peak = mx.get_peak_memory() / 1e9
        bar.set_postfix_str(
            f"loss {window.last_loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s mem {peak:.2f} GB",
            refresh=False,
        )
        bar.update(1)
        if self.rank == 0 and self.args.log_every and self.step % self.args.log_every == 0:
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
            self.metrics.append({"step": self.step, **val, "eval_seconds": seconds})
            self.plotter.submit(self.metrics.records)
            bar.write(
                f"step {self.step}: val loss {val['val_loss']:.4f}, ppl {val['val_ppl']:.2f}, "
                f"{val['val_bpb']:.4f} bits/byte",
                file=sys.stderr,
            )
        return val


class _Window:
    """Train losses and step times since the last metrics line."""

    def __init__(self):
        self.reset()
        self.last_loss = self.last_norm = float("nan")

    def reset(self) -> None:
        self.losses: list[float] = []
        self.seconds: list[float] = []

    def add(self, loss: float, norm: float, seconds: float) -> None:
        self.losses.append(loss)
        self.seconds.append(seconds)
        self.last_loss, self.last_norm = loss, norm

    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses)

    def tokens_per_sec(self, tokens_per_step: int) -> float:
        # The first step of a window may include compilation; a median is robust to it.
        return tokens_per_step / float(np.median(self.seconds[-50:]))


def _progress(args: TrainingArgs, rank: int, start: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=args.max_steps,
        initial=start,
        unit="step",
        dynamic_ncols=True,
        disable=not args.progress or rank != 0,
        file=sys.stderr,
    )


def train(args: TrainingArgs, on_step=None) -> TrainResult:
    """Train as `args` says; see the module docstring.

    Args:
        args: the resolved settings (`train_args.resolve` builds them from flags and files).
        on_step: optional callable(trainer, loss) run after every step (tests, custom logging).
    Returns:
        A TrainResult; `exit_code` is 0, or 130 / 143 when stopped by SIGINT / SIGTERM.
    Raises:
        TrainingDiverged: the loss became NaN or infinite (nothing saved after the last good
            checkpoint); UserError for bad settings or data.
    """
    trainer = Trainer(args)
    with training_environment(trainer.streams):
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
