"""FineTuner: the training loop (train, evaluate, keep the best, stop early) and its run state.

Scope: one model, one objective, one optimizer factory. What a step computes belongs to
`Objective`; which parameters train to the model and `OptimizerFactory`; everything
else that reacts to the loop (progress, early stopping, history files) is a `Callback`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from . import _card, _cpu_fast, _guard, _probe, _resume, _runtime, distributed
from ._batching import BatchLoader, Tokenized
from ._state import History, TrainState, plan_steps
from ._tokens import UNREADABLE, aggregate, unknown_share, warn_if_unreadable
from ._vocabulary import may_grow
from .callbacks import EVENTS, Callback, KeepBest, ProgressBar, notify_on_exception
from .data import DatasetAdapter
from .errors import ConfigError, DataError, TrainingError
from .objectives import Objective
from .optim import OptimizerFactory
from .tuning import FeatureLoader, encoder_frozen, refuse_quantized_default

__all__ = ["FineTuner", "TrainState", "History"]

logger = logging.getLogger("llmtune")


def _windows(batches: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Group micro-batches into accumulation windows of `size` (the last may be shorter)."""
    window: list[dict] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


class FineTuner:
    """Trains a ClassifierModel with an Objective and an OptimizerFactory.

    Args:
        model: a `ClassifierModel` (or a module with the same `forward`, `tokenizer`,
            `labels`, `task` and `max_length`).
        objective: the loss; default: the one for the model's task.
        optimizer: default `OptimizerFactory.adamw()` (lr 5e-5, head lr 1e-3, linear decay).
        epochs: passes over the training data (ignored when `max_steps` is set). None (the
            default) is 3, or more where the data is so small that 3 passes would give fewer
            than `min_steps` optimizer steps (logged at INFO; the history shows the epochs).
        max_steps: stop after this many optimizer steps; steps skipped (an fp16 overflow,
            `nonfinite="skip"`) do not count, so the run goes on into the next pass for them.
        min_steps: the fewest optimizer steps of a default-length (`epochs=None`) run. Three
            passes over 8 examples a class are 3 steps, too few for a new head to learn
            anything (benchmarks/results/quality.md); an explicit `epochs` is kept as given.
        batch_size: examples per optimizer step (split into `grad_accum` micro-batches).
        grad_accum: micro-batches per optimizer step; the loss of each is weighted by its
            share of the step's examples, so the gradient equals that of one big batch.
        max_grad_norm: clip the global gradient norm (None: no clipping).
        precision: "auto", "fp32", "bf16" or "fp16" (autocast; fp16 uses a grad scaler on CUDA).
        device: "auto" (cuda, mps, cpu) or a torch device.
        seed: seeds Python, NumPy, torch and the batch order.
        metrics: extra `fn(logits, targets) -> float` by name, added to the objective's.
        callbacks: extra callbacks; a progress bar and best-weights restore are added
            unless `progress=False` / `keep_best=False` (or one of that type is given).
        group_by_length: length-grouped training batches (less padding, faster).
        nonfinite: what a NaN or infinite loss or gradient norm does: "raise" stops with a
            `TrainingError` naming the step and batch, before the weights change; "skip"
            drops that optimizer step (counted as `skipped_steps` in each epoch's record).
        fast_cpu: on a CPU, train with cheaper dropout masks, one GEMM for each attention
            layer's query/key/value and a sparse word-embedding backward (same maths, ~1.3x
            the speed; see benchmarks/README.md). The masks come from a different random
            stream than torch's dropout; False uses torch's own kernels.
        probe: fit the head alone first, on the frozen encoder's features of the training data
            (L2-regularised, its strength by held-out loss on training folds and validation
            data: `llmtune._probe`), so training
            starts from a head that already fits (LP-FT). With validation data the probed
            model is also scored before the first epoch, and best-weights restore can keep
            it: on 8 examples a class the probe alone beats fine-tuning. None (default): only
            for the small runs that `min_steps` lengthens; it costs one inference pass over
            the training data.
        extend_vocabulary: add the text the tokenizer reads as its unknown token as new
            tokens before training (`ClassifierModel.extend_vocabulary`, logged). None
            (default): when 5% or more of the training tokens are unknown and every weight
            trains (no `tune()` or `Full()`); English text in an English vocabulary has ~0.1%.

    Example:
        >>> tuner = FineTuner(model, epochs=3, batch_size=32)  # doctest: +SKIP
        >>> history = tuner.fit(train, val)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: torch.nn.Module,
        objective: Objective | None = None,
        optimizer: OptimizerFactory | None = None,
        *,
        epochs: int | None = None,
        max_steps: int | None = None,
        min_steps: int = 100,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        grad_accum: int = 1,
        max_grad_norm: float | None = 1.0,
        precision: str = "auto",
        device: str | torch.device = "auto",
        seed: int = 0,
        metrics: dict[str, Callable[[np.ndarray, np.ndarray], float]] | None = None,
        callbacks: Sequence[Callback] = (),
        progress: bool = True,
        keep_best: bool = True,
        group_by_length: bool = True,
        nonfinite: str = "raise",
        fast_cpu: bool = True,
        probe: bool | None = None,
        extend_vocabulary: bool | None = None,
    ) -> None:
        if epochs is not None and epochs < 1 and max_steps is None:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        if max_steps is not None and max_steps < 1:  # 0 read as unset and ran a whole default run
            raise ConfigError(f"max_steps must be >= 1 or None, got {max_steps}")
        if batch_size < grad_accum or batch_size % grad_accum:
            raise ConfigError(f"batch_size={batch_size} must be a multiple of grad_accum={grad_accum}")
        if nonfinite not in ("raise", "skip"):
            raise ConfigError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        self.model = model
        self.probe = probe
        self.extend_vocabulary = extend_vocabulary
        self.probe_metrics: dict[str, float] | None = None  # the probed head's validation metrics
        self.probed: bool | None = None  # whether the last fit started from the probe
        self.objective = objective or Objective.for_task(model.task)
        if self.objective.task != model.task:
            raise ConfigError(
                f"{self.objective!r} is for {self.objective.task} but the model is {model.task}"
            )
        outputs = getattr(getattr(model, "head", None), "out_features", None)
        if outputs is not None:
            self.objective.check(outputs)
        self.optimizer = optimizer or OptimizerFactory.adamw()
        if min_steps < 0:
            raise ConfigError(f"min_steps must be >= 0, got {min_steps}")
        self.epochs, self.max_steps, self.min_steps = epochs, max_steps, min_steps
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.max_grad_norm = max_grad_norm
        self.device = _runtime.resolve_device(device)
        self.dtype = _runtime.resolve_precision(precision, self.device)
        self.seed = seed
        self.metrics = {**self.objective.metrics(), **(metrics or {})}
        self.group_by_length = group_by_length
        self.nonfinite = nonfinite
        self.fast_cpu = fast_cpu
        self.callbacks = list(callbacks)
        if progress and not any(isinstance(c, ProgressBar) for c in self.callbacks):
            self.callbacks.insert(0, ProgressBar())
        if keep_best and not any(isinstance(c, KeepBest) for c in self.callbacks):
            self.callbacks.append(KeepBest())
        self.state = TrainState()
        self.dist = distributed.DistributedContext()

    @property
    def is_main(self) -> bool:
        """False on every data-parallel rank but 0; those print and write nothing."""
        return self.dist.is_main

    def emit(self, event: str, state: TrainState, **kwargs: Any) -> None:
        """Call `event` on every callback, in order."""
        assert event in EVENTS, event
        for callback in self.callbacks:
            getattr(callback, event)(self, state, **kwargs)

    # -- checks -------------------------------------------------------------------------

    def check_data(self, train: DatasetAdapter, validation: DatasetAdapter | None = None) -> None:
        """Refuse data that does not fit the model before any training starts."""
        model = self.model
        train.check_compatible(model.labels, model.task, "training")
        if validation is not None:
            validation.check_compatible(model.labels, model.task, "validation")
            unseen = set()
            if model.task == "classification":
                unseen = set(validation.dataset["label"]) - set(train.dataset["label"])
            if unseen:
                names = sorted(model.labels[i] for i in unseen)
                raise DataError(
                    f"labels {names} occur in validation ({validation.source}) but never in training "
                    f"({train.source}); the model cannot learn them. Use a stratified split."
                )
        train.check_trainable()  # after the validation checks: their messages say more

    # -- the loop -----------------------------------------------------------------------

    def train_loader(self, train: DatasetAdapter) -> BatchLoader:
        """Shuffled (length-grouped) training batches, this rank's share under data parallelism."""
        return train.loader(
            self.model.tokenizer,
            batch_size=self.batch_size // self.grad_accum,
            max_length=self.model.max_length,
            stride=getattr(self.model, "stride", None),
            shuffle=True,
            group_by_length=self.group_by_length,
            seed=self.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            pad_multiple=_runtime.pad_multiple(self.device),
        )

    def grow_vocabulary(self, train: DatasetAdapter, share: float | None) -> list[str]:
        """`extend_vocabulary` on the training data where the setting asks for it; the tokens added.

        `share` is `unknown_share` of the training tokens through the vocabulary as it is."""
        model = self.model
        wanted = self.extend_vocabulary
        if wanted is None:
            wanted = may_grow(model) and share is not None and share >= UNREADABLE
        if not wanted or not hasattr(model, "extend_vocabulary"):
            return []
        added = model.extend_vocabulary(train)
        if added:
            logger.warning(
                "%.0f%% of the tokens of %s are the unknown token %r: added %d tokens the training "
                "text has at least twice (e.g. %s) to the vocabulary, with new embedding rows that "
                "train at the head's LR (FineTuner(extend_vocabulary=False) keeps the vocabulary)",
                100 * (share or 0),
                train.source,
                model.tokenizer.unk_token,
                len(added),
                " ".join(added[:8]),
            )
        return added

    @notify_on_exception  # callbacks release what they hold (a checkpoint directory's lock)
    def fit(
        self,
        train: DatasetAdapter,
        validation: DatasetAdapter | None = None,
        *,
        resume_from: str | os.PathLike | None = None,
    ) -> History:
        """Train on `train`, evaluating on `validation` after each epoch; returns the History.

        Args:
            train: the training data.
            validation: evaluated after each epoch; its metrics go to the history and callbacks.
            resume_from: a checkpoint directory, or "latest": the newest complete checkpoint
                of the `Checkpoint` callback (a fresh start while there is none). The run
                continues exactly where the checkpoint was written.

        Raises:
            CheckpointError: the checkpoint is damaged, or from another model, label set or data.
            ConfigError: a quantized encoder with no strategy chosen, or fp16 precision (the grad
                scaler's) with fp16 weights that train.
            TrainingError: a non-finite loss or gradient norm (with `nonfinite="raise"`).
        """
        self.check_data(train, validation)
        refuse_quantized_default(self.model)
        _runtime.refuse_fp16_weights(self.model, self.dtype)
        if hasattr(self.model, "reset_calibration"):  # fitted to weights that training changes
            self.model.reset_calibration()
        # Under torchrun: join the process group; batch_size is then per rank (as in DDP).
        self.dist, self.device = distributed.setup(self.device)
        model = self.model.to(self.device)
        _runtime.seed_everything(self.seed)
        loader = self.train_loader(train)
        share = unknown_share(loader.data.input_ids, model.tokenizer)
        grown = bool(self.grow_vocabulary(train, share))
        if grown:
            loader = self.train_loader(train)  # the text again, through the grown vocabulary
            share = unknown_share(loader.data.input_ids, model.tokenizer)
        warn_if_unreadable(share, model.tokenizer, train.source, grown)
        # "latest" with no checkpoint yet is a fresh start and gets what a fresh start gets.
        checkpoint = _resume.resolve(self, resume_from) if resume_from is not None else None
        mean = _probe.start_at_mean(model, loader.data.text_labels) if checkpoint is None else None
        if mean is not None:
            logger.info("the new regression head starts at the training targets' mean %s", mean)
        loader = self.cache_features(loader)
        steps_per_epoch = math.ceil(len(loader) / self.grad_accum)
        total_steps, small = plan_steps(steps_per_epoch, self.epochs, self.max_steps, self.min_steps)
        probeable = _probe.probeable(model)
        if self.probe and not probeable:
            raise ConfigError(
                f"probe=True needs a model with a linear `head` and an `encode` method (as "
                f"ClassifierModel has); {type(model).__name__} has not."
            )
        probed = checkpoint is None and probeable and (self.probe or (self.probe is None and small))
        self.probed = probed  # what the run did with probe=None (logged, and on the model card)
        if probed:
            self.probe_head(loader, validation)
        epochs = math.ceil(total_steps / steps_per_epoch)
        optimizer, scheduler = self.optimizer.build(model, total_steps)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        state = self.state = TrainState(
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            batches_per_epoch=len(loader),
            epoch_loss=torch.zeros((), device=self.device),
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
        )
        # Weights, optimizer, schedule, counters and history come back before on_fit_start (a
        # HistoryLogger writes the history there); callback state and RNG after it (it resets them).
        resumed = _resume.resume_run(self, checkpoint, train) if checkpoint is not None else None
        self.emit("on_fit_start", state, train=train, validation=validation)
        if resumed is not None:
            resumed.restore_callbacks_and_rng(self)
        self.probe_metrics = None
        if probed and validation is not None:  # the probed model is a candidate too ("epoch 0")
            state.epoch = -1
            state.metrics, outputs = self._evaluate(validation)
            self.probe_metrics = state.metrics
            logger.info("epoch 0 (the probed head): %s", state.metrics)
            self.emit("on_evaluate", state, metrics=state.metrics, outputs=outputs)
            state.epoch = 0
        net = self.dist.wrap(model, self.device)
        # Same maths, cheaper CPU kernels (see _cpu_fast); the sparse embedding gradient is
        # single-process only, as DDP's reducer wants dense gradients. The fast paths are
        # also the loop's gradient plug: the sparse rows stand in for the embedding's gradient.
        grads: Any = _guard.Gradients(model)
        fast = contextlib.nullcontext()
        if self.fast_cpu and self.device.type == "cpu":
            fast = grads = _cpu_fast.FastPaths(model, sparse_embedding=self.dist.world_size == 1)
        # max_steps counts steps that happened: a pass with skipped ones (fp16 overflow,
        # nonfinite="skip") leaves some to the next, while each pass still makes progress.
        last = epochs if self.max_steps is None else None
        with fast:
            for epoch in itertools.count(state.epoch):
                if state.step >= total_steps or state.should_stop or (last is not None and epoch >= last):
                    break
                state.epoch = epoch
                loader.set_epoch(epoch)
                model.train()
                self.emit("on_epoch_start", state)
                before = state.step
                self._train_epoch(net, loader, grads)

                record: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "step": state.step,
                    "train_loss": (self.dist.sum(state.epoch_loss) / state.epoch_examples).item(),
                }
                if self.nonfinite == "skip" or scaler.is_enabled():
                    record["skipped_steps"] = state.epoch_skipped
                if validation is not None:
                    state.metrics, outputs = self._evaluate(validation)
                    record.update({f"val_{k}": v for k, v in state.metrics.items()})
                    self.emit("on_evaluate", state, metrics=state.metrics, outputs=outputs)
                state.history.records.append(record)
                logger.info("epoch %d: %s", epoch + 1, record)
                self.emit("on_epoch_end", state)
                state.next_epoch()
                if last is None and state.step == before:  # every step of a pass skipped
                    break
        self.emit("on_fit_end", state)
        self.model.training_record = _card.run_record(self, train, validation)  # for its model card
        return state.history

    def _train_epoch(self, net: torch.nn.Module, loader: BatchLoader | FeatureLoader, grads: Any) -> None:
        """One epoch's optimizer steps (or fewer, at max_steps or should_stop)."""
        state = self.state
        # A resumed run continues inside its epoch: the batch order is fixed by (seed, epoch).
        for window in _windows(itertools.islice(loader, state.batches_done, None), self.grad_accum):
            n, losses = self._backward(net, window)
            state.batches_done += len(window)
            if not self._step(losses, grads):
                continue
            step_loss = torch.stack(losses).sum()
            state.step += 1
            state.examples_seen += n
            state.epoch_loss += step_loss * n / self.dist.world_size  # this rank's share of the sum
            state.epoch_examples += n
            tokens = sum(int(b["attention_mask"].sum()) for b in window if "attention_mask" in b)
            self.emit("on_step_end", state, loss=step_loss, examples=n, tokens=tokens)
            if state.step >= state.total_steps or state.should_stop:
                break

    def _backward(self, net: torch.nn.Module, window: list[dict]) -> tuple[int, list[torch.Tensor]]:
        """Forward and backward over one accumulation window; returns (examples on all ranks, losses).

        Each batch's mean loss weighs its share of the window's examples (or of what the
        objective averages over: `Objective.denominator`), so the accumulated gradient is that of
        one batch of all n examples; DDP averages over ranks, hence the factor `world`.
        """
        world, scaler = self.dist.world_size, self.state.scaler
        n = self.dist.total(sum(len(batch["labels"]) for batch in window))
        shares: list[float] = [len(batch["labels"]) for batch in window]
        total = float(n)
        if (weights := [self.objective.denominator(batch["labels"]) for batch in window])[0] is not None:
            shares = weights  # one more all-reduce, only for objectives that need it
            total = float(self.dist.sum(torch.tensor(sum(weights), dtype=torch.float64)))
        losses = []
        for i, batch in enumerate(window):
            batch = _runtime.to_device(batch, self.device)
            with self.dist.no_sync(net, sync=i == len(window) - 1):
                with _runtime.autocast(self.device, self.dtype):
                    logits = net(**batch)
                loss = self.objective(logits, batch["labels"]) * (shares[i] * world / total)
                scaler.scale(loss).backward()
            losses.append(loss.detach())
        return n, losses

    def _step(self, losses: list[torch.Tensor], grads: Any) -> bool:
        """Check, clip and apply the accumulated gradients; False when the step is skipped.

        A skipped step (non-finite with `nonfinite="skip"`, or an fp16 overflow the grad
        scaler refused) leaves weights, schedule and step counter as they were and is counted
        in `skipped_steps`. The finite check is the loop's one host sync per step, and one
        decision for all data-parallel ranks, so none steps while another skips.
        """
        state = self.state
        optimizer, scheduler, scaler = state.optimizer, state.scheduler, state.scaler
        tensors = grads.tensors()
        norm = _guard.grad_norm(tensors, optimizer, scaler)
        if not self.dist.all_true(_guard.finite(losses, norm, scaler)):
            message = _guard.describe(self.model, losses, norm, state)
            if self.nonfinite == "raise":
                raise TrainingError(
                    f"{message} Lower the learning rate, check the data for extreme values, or pass "
                    "FineTuner(nonfinite='skip') to skip such steps."
                )
            logger.warning("skipped: %s", message)
            return self._skipped(optimizer, scaler.update)
        # Below the threshold clipping multiplies every gradient by 1.0: skip that pass
        # (2.5 ms of a 150 ms MiniLM CPU step). The check has just synced: the read is free.
        limit = math.inf if self.max_grad_norm is None else self.max_grad_norm
        if limit < float(norm) + 1e-6 < math.inf:  # an fp16 overflow: the scaler skips it below
            _guard.clip(tensors, limit, norm)
        grads.before_step()
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(optimizer)
        scaler.update()
        if scale is not None and scaler.get_scale() < scale:
            # The scaler found inf/NaN gradients and left the weights alone (the usual first
            # steps of fp16, until the scale fits): not a step, as for the guard.
            logger.info(
                "fp16 overflow at step %d: skipped; loss scale %g -> %g",
                state.step + 1,
                scale,
                scaler.get_scale(),
            )
            return self._skipped(optimizer)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return True

    def _skipped(self, optimizer: torch.optim.Optimizer, then: Callable[[], Any] = lambda: None) -> bool:
        optimizer.zero_grad(set_to_none=True)
        then()  # after a guard skip the fp16 scaler still lowers its scale
        self.state.epoch_skipped += 1
        self.state.skipped += 1
        return False

    def probe_head(
        self, loader: BatchLoader | FeatureLoader, validation: DatasetAdapter | None = None
    ) -> float:
        """Fit the head alone on the encoder's features of the training batches (see `probe`).

        The validation data, if given, help choose the L2 strength (`llmtune._probe`).
        """
        strength = _probe.probe(self, loader, validation)
        logger.info("probe: head fitted on frozen features, L2 strength %g", strength)
        return strength

    def cache_features(self, loader: BatchLoader) -> BatchLoader | FeatureLoader:
        """On a frozen encoder (e.g. `HeadOnly`), run it once per example and train on its features.

        Returns a `FeatureLoader` that yields the same batches as `loader`, with cached pooled
        features in place of tokens, so every epoch costs only the head; otherwise `loader`.
        Override and return `loader` to always run the encoder.
        """
        if not encoder_frozen(self.model):
            return loader
        return FeatureLoader.build(
            self.model, loader, self.device, self.dtype, self.eval_batch_size, dist=self.dist
        )

    # -- evaluation and prediction -------------------------------------------------------

    def _tokens(self, data: DatasetAdapter) -> Tokenized:
        model = self.model
        return data.tokenize(model.tokenizer, model.max_length, getattr(model, "stride", None))

    def predict(self, data: DatasetAdapter) -> np.ndarray:
        """Raw model outputs (logits) for every example, in data order, shape (N, num_labels).

        A text read as several windows (`ClassifierModel(stride=...)`) gets their aggregate.
        """
        model = self.model.to(self.device)
        tokenized = self._tokens(data)
        # Data-parallel ranks each run a share of the rows and exchange the outputs.
        mine = np.arange(len(tokenized))[self.dist.rank :: self.dist.world_size]
        with _runtime.autocast(self.device, self.dtype):
            rows = model.outputs(tokenized, self.eval_batch_size, indices=mine)
        rows = self.dist.gather_rows(rows, mine, len(tokenized))
        return aggregate(rows, tokenized.text, getattr(model, "aggregation", "mean"))

    def evaluate(self, data: DatasetAdapter) -> dict[str, float]:
        """Loss and metrics over all of `data` (eval mode, no gradients).

        At the model's calibrated temperature (1.0 until `ClassifierModel.calibrate`), which
        moves the loss and the calibration error ("ece"), not any argmax.
        """
        return self._evaluate(data)[0]

    def _evaluate(self, data: DatasetAdapter) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
        """`evaluate`'s metrics and the (logits, targets) they come from, one row per text."""
        # Ids are positions in a label list: data built with its own list would be scored
        # against the wrong names (a test set without 1-star reviews shifts every id by one).
        data.check_compatible(self.model.labels, self.model.task, "evaluation")
        logits = self.predict(data) / getattr(self.model, "temperature", 1.0)
        targets = self._tokens(data).text_labels
        metrics = {name: self.score(name, logits, targets) for name in ("loss", *self.metrics)}
        return metrics, (logits, targets)

    def score(self, name: str, logits: np.ndarray, targets: np.ndarray) -> float:
        """One validation metric ("loss" or a name in `metrics`) of `logits` against `targets`."""
        if name == "loss":
            return float(self.objective(torch.from_numpy(logits), torch.from_numpy(targets)))
        return float(self.metrics[name](logits, targets))
