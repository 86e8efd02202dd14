"""Training whose batch size a policy changes between epochs.

`AdaptiveBatchSize` is the Keras callback that requests a decision from a
`tf_fisher.batch_size_policies` policy at each epoch end and stops `fit`
when the batch size changes. `fit_adaptive` then rebuilds the input
pipeline with the new batch size and resumes at the next epoch with the
same model, optimizer state and callbacks, so C̄_K and L_K keep
accumulating.
`train_adaptive` does this for a `tf_fisher.run.RunConfig` and writes a run
folder with `decisions.csv` next to `samples.csv` and `epochs.csv`.

Example:

```python
policy = batch_size_policies.NormTestPolicy(
    theta=0.9, min_batch_size=32, max_batch_size=512)
summary = adaptive.train_adaptive(
    run.RunConfig(batch_sizes=(32,), epochs=20, output_dir="runs/norm"),
    policy)
summary["batch_sizes"]  # the batch size of every epoch
```
"""

import os
import time

import keras
from absl import logging

from tf_fisher import batch_size_policies
from tf_fisher import callbacks as fisher_callbacks
from tf_fisher import data
from tf_fisher import run
from tf_fisher import schedules


class AdaptiveBatchSize(keras.callbacks.Callback):
    """Asks a batch-size policy at each epoch end and requests its change.

    Place it after `tf_fisher.FisherCallback`, which adds C̄_K, L_K and the
    gradient statistics to the epoch logs. When the policy picks another
    batch size, the callback stores it in `requested_batch_size` and sets
    `model.stop_training`, which ends the current `fit` after this epoch.
    `fit_adaptive` then resumes with an input pipeline of the new size. No
    decision is made after the last epoch, or when another callback has
    stopped training (for example on divergence).

    Args:
        policy: a `BatchSizePolicy`.
        batch_size: the batch size of the first epoch.
        num_epochs: the epochs of the whole run.
        fisher: the run's `FisherCallback`, whose probes of the epoch and
            running sums go to the policy; None passes none, which only
            policies without `needs_probes` accept.
        learning_rate_fn: function from a 0-based epoch to its learning
            rate, to give the policy `next_learning_rate`; None omits it.
        num_examples: training examples per epoch; None estimates it as
            steps per epoch times the batch size.
        output_dir: folder for `decisions.csv`; None writes no file.
        on_decision: function called with each `Decision`, for logging.

    Attributes:
        batch_size: the batch size in force.
        requested_batch_size: the batch size the next `fit` must use, or
            None when the current one continues.
        decisions: every `Decision`, in order.
    """

    def __init__(self, policy, batch_size, num_epochs, fisher=None,
                 learning_rate_fn=None, num_examples=None, output_dir=None,
                 on_decision=None):
        super().__init__()
        if (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                or batch_size < 1):
            raise ValueError(
                "Invalid batch_size: expected a positive integer. Received: "
                f"batch_size={batch_size!r}"
            )
        if policy.needs_probes and fisher is None:
            raise ValueError(
                f"The {policy.name} policy reads the probes of a "
                "FisherCallback. Received: fisher=None. Pass the run's "
                "FisherCallback as fisher=."
            )
        self.policy = policy
        self.batch_size = batch_size
        self.num_epochs = num_epochs
        self.fisher = fisher
        self.learning_rate_fn = learning_rate_fn
        self.num_examples = num_examples
        self._epoch_steps = 0
        self.on_decision = on_decision
        self.requested_batch_size = None
        self.decisions = []
        self._csv = None
        if output_dir is not None:
            self._csv = fisher_callbacks.AppendingCSV(
                os.path.join(output_dir, "decisions.csv"),
                batch_size_policies.DECISION_COLUMNS + policy.value_keys,
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self._epoch_steps += 1

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.num_epochs or self.model.stop_training:
            return
        decision = self.policy.decide(
            epoch, self.batch_size, self._policy_logs(epoch, logs),
            self._epoch_samples(epoch),
        )
        self.decisions.append(decision)
        if self._csv is not None:
            self._csv.write(decision.row())
        if self.on_decision is not None:
            self.on_decision(decision)
        if decision.new_batch_size != self.batch_size:
            self.requested_batch_size = decision.new_batch_size
            self.model.stop_training = True

    def _policy_logs(self, epoch, logs):
        context = dict(logs or {})
        context["learning_rate"] = fisher_callbacks.current_learning_rate(
            self.model.optimizer
        )
        if self.learning_rate_fn is not None:
            context["next_learning_rate"] = self.learning_rate_fn(epoch + 1)
        context["num_examples"] = self.num_examples
        if self.num_examples is None:
            # A dataset of unknown length gives Keras no step count, so the
            # callback counts the steps. The optimizer's step counter is no
            # use there: with Keras 3.15 it rose by 9 over 8 batches of a
            # generator dataset.
            steps = self.params.get("steps") or self._epoch_steps
            context["num_examples"] = steps * self.batch_size
        context["fisher_interval"] = getattr(
            self.model, "fisher_interval", None
        )
        if self.fisher is not None:
            context.update(self.fisher.running.state())
        return context

    def _epoch_samples(self, epoch):
        if self.fisher is None:
            return []
        return [row for row in self.fisher.samples if row["epoch"] == epoch + 1]

    def apply_request(self):
        """Switch to the requested batch size; return False if none."""
        if self.requested_batch_size is None:
            return False
        self.batch_size = self.requested_batch_size
        self.requested_batch_size = None
        return True

    def on_train_end(self, logs=None):
        if self._csv is not None:
            self._csv.close()


def fit_adaptive(model, make_dataset, adaptive, epochs, callbacks=(),
                 on_segment_begin=None, **fit_kwargs):
    """Train `model` for `epochs` epochs with the batch sizes of `adaptive`.

    Calls `model.fit` on `make_dataset(batch_size, first_epoch)` from epoch
    0. Each time `adaptive` requests another batch size, the next `fit`
    resumes at the following epoch on a dataset rebuilt with that size.
    The model, its optimizer state (momentum included) and every callback
    carry over from one `fit` to the next.

    Args:
        model: a compiled `keras.Model`, usually a `tf_fisher.FisherModel`.
        make_dataset: function (batch_size, first_epoch) -> training data
            for `fit`, one epoch per iteration.
        adaptive: the `AdaptiveBatchSize` callback; appended to `callbacks`
            when missing.
        epochs: total number of epochs.
        callbacks: the other callbacks, shared by every `fit`.
        on_segment_begin: function (index, batch_size, first_epoch) called
            before each `fit`; None calls nothing.
        **fit_kwargs: passed to every `fit` (for example validation_data).

    Returns:
        One dict per `fit` call with its `batch_size`, 1-based `first_epoch`
        and `last_epoch`, and `wall_seconds`.
    """
    callbacks = list(callbacks)
    if adaptive not in callbacks:
        callbacks.append(adaptive)
    segments = []
    first_epoch = 0
    while first_epoch < epochs:
        batch_size = adaptive.batch_size
        if on_segment_begin is not None:
            on_segment_begin(len(segments), batch_size, first_epoch)
        start = time.time()
        history = model.fit(
            make_dataset(batch_size, first_epoch),
            initial_epoch=first_epoch,
            epochs=epochs,
            callbacks=callbacks,
            **fit_kwargs,
        )
        end_epoch = first_epoch + len(history.epoch)
        segments.append({
            "batch_size": batch_size,
            "first_epoch": first_epoch + 1,
            "last_epoch": end_epoch,
            "wall_seconds": time.time() - start,
        })
        if not adaptive.apply_request():
            break
        first_epoch = end_epoch
    return segments


def train_adaptive(config, policy, splits=None):
    """Train one run whose batch size `policy` chooses; write its folder.

    The run starts at `config.batch_sizes[0]` and writes the folder of
    `tf_fisher.run.train`, plus `decisions.csv` (one row per epoch but the
    last, with the values behind each decision). config.json and
    summary.json also hold the policy under "adaptive"; the summary lists
    the decisions and the batch size of every epoch.

    Args:
        config: the `tf_fisher.run.RunConfig`. Its `batch_sizes` contains
            the first batch size only.
        policy: a `tf_fisher.batch_size_policies.BatchSizePolicy`.
        splits: the `tf_fisher.data.DatasetSplits` to train on; None loads
            `config.dataset`.

    Returns:
        The summary dict.

    Raises:
        ValueError: for an invalid configuration or policy (before anything
            is written).
        tf_fisher.data.DatasetNotFoundError: when the dataset is not
            prepared.
    """
    _check_adaptive_config(config, policy)
    if splits is None:
        splits = data.load_dataset(config.dataset, config.data_dir)
    _check_sizes_fit_data(config, policy, splits.num_train)
    splits = data.with_augmentation(splits, config.augment)
    os.makedirs(config.output_dir, exist_ok=True)
    run.write_json_atomically(
        os.path.join(config.output_dir, "config.json"),
        dict(run.config_record(config, splits), adaptive=policy.describe()),
    )
    logging.info(
        "Training %s on %s for %d epoch%s with the %s batch-size policy "
        "(batch sizes %d to %d, first %d) into %s",
        config.model, config.dataset, config.epochs,
        "" if config.epochs == 1 else "s", policy.name,
        policy.min_batch_size, policy.max_batch_size, config.batch_sizes[0],
        config.output_dir,
    )
    model = run.build_fisher_model(config, splits)
    run.write_hparams(
        config, _schedule_name(config, policy),
        augmentation=data.augmentation_name(splits),
    )
    summary = _fit_with_policy(model, config, splits, policy)
    # A sweep skips a run whose folder has summary.json, so the status is
    # written first: a run stopped between the two writes is rerun.
    run.write_status(config.output_dir, summary["status"])
    run.write_json_atomically(
        os.path.join(config.output_dir, "summary.json"), summary
    )
    logging.info(
        "Run %s: %s in %.1f s, %d steps, batch sizes %s, test error %.2f%%",
        config.output_dir, summary["status"], summary["wall_seconds"],
        summary["measures"]["num_iterations"],
        format_size_runs(summary["batch_sizes"]),
        100 * summary["final"]["test_error"],
    )
    return summary


def _fit_with_policy(model, config, splits, policy):
    fisher, recorder, tensorboard = run.make_recorders(config)
    adaptive = AdaptiveBatchSize(
        policy,
        config.batch_sizes[0],
        config.epochs,
        fisher=fisher,
        learning_rate_fn=lambda epoch: schedules.learning_rate_for_epoch(
            epoch, config.epochs, config.learning_rate
        ),
        num_examples=splits.num_train,
        output_dir=config.output_dir,
        on_decision=_log_decision,
    )
    callbacks = [
        schedules.StepDecay(config.learning_rate, config.epochs),
        _BatchSizeLogs(adaptive, recorder),
        tensorboard,
        fisher,
        recorder,
        adaptive,
    ]

    def on_segment_begin(index, batch_size, first_epoch):
        recorder.stage = index
        recorder.batch_size = batch_size

    segments = fit_adaptive(
        model,
        lambda batch_size, first_epoch: data.train_pipeline(
            splits, batch_size, config.seed, epoch_seed_offset=first_epoch
        ),
        adaptive,
        config.epochs,
        callbacks,
        on_segment_begin,
        validation_data=data.eval_pipeline(
            splits.test_images, splits.test_labels, batch_size=500
        ),
        shuffle=False,
        verbose=config.verbose,
    )
    if fisher.diverged_at is not None:
        logging.error(
            "Run %s diverged: %s. Its records so far are kept.",
            config.output_dir, fisher.diverged_at,
        )
    summary = run.run_summary(config, recorder, fisher, segments)
    summary["schedule"] = _schedule_name(config, policy)
    summary["adaptive"] = policy.describe()
    summary["decisions"] = [decision.row() for decision in adaptive.decisions]
    summary["batch_sizes"] = [row["batch_size"] for row in recorder.rows]
    return summary


def _schedule_name(config, policy):
    return config.schedule or f"adaptive-{policy.name}"


class _BatchSizeLogs(keras.callbacks.Callback):
    """Adds `batch_size` and `stage` to the epoch logs; placed before
    `keras.callbacks.TensorBoard`, which writes them as scalars."""

    def __init__(self, adaptive, recorder):
        super().__init__()
        self._adaptive = adaptive
        self._recorder = recorder

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["batch_size"] = self._adaptive.batch_size
            logs["stage"] = self._recorder.stage


def check_run(config, policy, num_train):
    """Raise ValueError unless `config` and `policy` make a valid adaptive
    run on `num_train` training examples."""
    _check_adaptive_config(config, policy)
    _check_sizes_fit_data(config, policy, num_train)


def _check_sizes_fit_data(config, policy, num_train):
    run.check_batch_sizes([config.batch_sizes[0]], num_train)
    if policy.max_batch_size > num_train:
        raise ValueError(
            f"Invalid max_batch_size {policy.max_batch_size}: the training "
            f"set has only {num_train} examples. Use at most {num_train}."
        )


def _check_adaptive_config(config, policy):
    run.check_options(config)
    if len(config.batch_sizes) != 1 or config.stage_epochs is not None:
        raise ValueError(
            "An adaptive run starts from one batch size and has no fixed "
            f"stages. Received: batch_sizes={list(config.batch_sizes)}, "
            f"stage_epochs={config.stage_epochs}. Pass a single batch size."
        )
    first = config.batch_sizes[0]
    if not policy.min_batch_size <= first <= policy.max_batch_size:
        raise ValueError(
            f"Invalid first batch size {first}: it lies outside the "
            f"policy's bounds [{policy.min_batch_size}, "
            f"{policy.max_batch_size}]. Start inside the bounds."
        )
    target = getattr(policy, "target", None)
    if target is not None and target.num_epochs < config.epochs:
        raise ValueError(
            f"Invalid target: it covers {target.num_epochs} epochs, but the "
            f"run has epochs={config.epochs}."
        )


def _log_decision(decision):
    logging.info(
        "epoch %d: %s batch size %d -> %d: %s",
        decision.epoch, decision.action, decision.batch_size,
        decision.new_batch_size, decision.reason,
    )


def format_size_runs(sizes, separator=", "):
    """Return run-length text, "32x3, 64x2" for [32, 32, 32, 64, 64]."""
    runs = []
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1][1] += 1
        else:
            runs.append([size, 1])
    return separator.join(f"{size}x{count}" for size, count in runs)
