"""Study configurations: grids of training runs, expanded into run folders.

A `Study` is a list of `Grid`s. A grid trains one model on one dataset for a
fixed number of epochs, once for every batch size x learning rate x seed, and
once for every dynamic batch-size schedule x seed at the schedule learning
rate. Each run gets the folder

    OUTPUT_DIR/{grid name}/{schedule}_lr{learning rate}_seed{seed}

for example `runs/cpu/mnist5k_mlp_e20/s32_lr0.05_seed0` or
`runs/cpu/mnist5k_mlp_e20/s32-to-512-MS_lr0.1_seed1`.

A configuration module (see `experiments/configs/`) defines `get_study()`,
which returns a `Study`.
"""

import collections.abc
import dataclasses
import importlib
import importlib.util
import os

from tf_fisher import data
from tf_fisher import models
from tf_fisher import run
from tf_fisher import schedules

# RunConfig fields that a grid sets itself; `Grid.options` may set the others.
_GRID_FIELDS = frozenset(
    {
        "dataset",
        "model",
        "epochs",
        "learning_rate",
        "batch_sizes",
        "schedule",
        "seed",
        "output_dir",
        "stage_epochs",
    }
)


@dataclasses.dataclass(frozen=True)
class Grid:
    """One model on one dataset over a grid of training configurations.

    Attributes:
        dataset: one of `tf_fisher.data.DATASET_NAMES`.
        model: one of `tf_fisher.models.MODEL_NAMES`.
        epochs: epochs of every run of the grid.
        batch_sizes: the fixed batch sizes of the grid.
        learning_rates: the initial learning rates of the grid.
        seeds: one run per seed and configuration.
        schedules: dynamic batch-size schedules, such as "s32-to-512" or
            "s32-to-512-MS" (see `tf_fisher.schedules.parse_schedule`),
            trained at `schedule_learning_rate`.
        schedule_learning_rate: initial learning rate of the schedules. The
            fixed-batch runs at this rate are the schedules' "beacons".
        beacon_batch_sizes: batch sizes of the beacons; empty uses
            `batch_sizes`. Beacon runs missing from the grid are added when
            the grid has schedules.
        options: further `tf_fisher.run.RunConfig` fields for every run,
            such as {"fisher_interval": 50, "data_dir": "~/tfds"}.
        name: folder of the grid's runs; empty gives
            "{dataset}_{model}_e{epochs}".
    """

    dataset: str
    model: str
    epochs: int
    batch_sizes: tuple
    learning_rates: tuple
    seeds: tuple = (0, 1)
    schedules: tuple = ()
    schedule_learning_rate: float = 0.1
    beacon_batch_sizes: tuple = ()
    options: dict = dataclasses.field(default_factory=dict)
    name: str = ""

    @property
    def folder(self):
        """Return the grid's folder name."""
        return self.name or f"{self.dataset}_{self.model}_e{self.epochs}"


@dataclasses.dataclass(frozen=True)
class Study:
    """A named list of grids.

    Attributes:
        name: default output folder name, `runs/{name}`.
        grids: the `Grid`s of the study.
        description: what the study shows and how long it runs.
    """

    name: str
    grids: tuple
    description: str = ""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a study.

    Attributes:
        name: the run folder relative to the sweep's output folder.
        grid: folder name of the run's grid.
        config: the `tf_fisher.run.RunConfig` of the run.
    """

    name: str
    grid: str
    config: run.RunConfig


def run_name(schedule, learning_rate, seed):
    """Return the folder name of one run of a grid, e.g. "s32_lr0.1_seed0"."""
    return f"{schedule}_lr{learning_rate:g}_seed{seed}"


def check_study(study):
    """Raise ValueError, naming the grid and field, if `study` is invalid.

    Raises:
        TypeError: if `study` is not a `Study`.
        ValueError: for an invalid grid.
    """
    if not isinstance(study, Study):
        raise TypeError(
            "A study configuration must return an experiments.study.Study. "
            f"Received: {type(study).__name__}."
        )
    if not study.grids:
        raise ValueError(f"Study {study.name!r} has no grid.")
    folders = [grid.folder for grid in study.grids]
    duplicates = sorted({name for name in folders if folders.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"Study {study.name!r} has several grids with the folder "
            f"{duplicates}. Give them distinct `name`s."
        )
    for grid in study.grids:
        _check_grid(grid)


def _check_grid(grid):
    where = f"grid {grid.folder!r}"
    if grid.dataset not in data.DATASET_NAMES:
        raise ValueError(
            f"Invalid dataset {grid.dataset!r} in {where}. Expected one of "
            f"{', '.join(data.DATASET_NAMES)}."
        )
    if grid.model not in models.MODEL_NAMES:
        raise ValueError(
            f"Invalid model {grid.model!r} in {where}. Expected one of "
            f"{', '.join(models.MODEL_NAMES)}."
        )
    _check_positive_ints([grid.epochs], "epochs", where)
    _check_positive_ints(grid.batch_sizes, "batch_sizes", where)
    if grid.beacon_batch_sizes:
        _check_positive_ints(
            grid.beacon_batch_sizes, "beacon_batch_sizes", where
        )
    _check_positive_numbers(grid.learning_rates, "learning_rates", where)
    _check_positive_numbers(
        [grid.schedule_learning_rate], "schedule_learning_rate", where
    )
    seeds = _as_list(grid.seeds, "seeds", where)
    if not seeds or any(
        isinstance(seed, bool)
        or not isinstance(seed, int)
        or not 0 <= seed <= run.MAX_SEED
        for seed in seeds
    ):
        raise ValueError(
            f"Invalid seeds {grid.seeds!r} in {where}: expected a non-empty "
            f"list of integers from 0 to {run.MAX_SEED}."
        )
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"Repeated seed in {where}: {grid.seeds!r}.")
    for name in _as_list(grid.schedules, "schedules", where):
        try:
            schedules.parse_schedule(name, grid.epochs)
        except ValueError as error:
            raise ValueError(f"In {where}: {error}") from error
    _check_options(grid.options, where)


def _as_list(values, field, where):
    """Return `values` as a list. A single value or a string in place of a
    tuple raises ValueError, where `list` would fail or split the string."""
    if isinstance(values, str | bytes) or not isinstance(
        values, collections.abc.Iterable
    ):
        # ValueError, as for every invalid grid field: the sweep reports it
        # as invalid input.
        raise ValueError(  # noqa: TRY004
            f"Invalid {field} in {where}: expected a tuple, such as "
            f"({values!r},). Received: {values!r}."
        )
    return list(values)


def _check_positive_ints(values, field, where):
    values = _as_list(values, field, where)
    if not values or any(
        isinstance(value, bool) or not isinstance(value, int) or value < 1
        for value in values
    ):
        raise ValueError(
            f"Invalid {field} in {where}: expected positive integers. "
            f"Received: {values!r}."
        )


def _check_positive_numbers(values, field, where):
    values = _as_list(values, field, where)
    if not values or any(
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value > 0
        for value in values
    ):
        raise ValueError(
            f"Invalid {field} in {where}: expected positive numbers. "
            f"Received: {values!r}."
        )


def _check_options(options, where):
    known = {field.name for field in dataclasses.fields(run.RunConfig)}
    for key in options:
        if key in _GRID_FIELDS:
            raise ValueError(
                f"Invalid option {key!r} in {where}: the grid sets it. Use "
                "the Grid field of that name instead."
            )
        if key not in known:
            raise ValueError(
                f"Unknown option {key!r} in {where}. Expected RunConfig "
                f"fields: {', '.join(sorted(known - _GRID_FIELDS))}."
            )
    # The checks that training applies to these fields, made before any
    # run starts.
    try:
        run.check_options(run.RunConfig(**options))
    except ValueError as error:
        raise ValueError(f"In {where}: {error}") from error


def expand(study, output_dir):
    """Return the `RunSpec`s of a study, seed by seed.

    All runs of the first seed come first, so an interrupted sweep has a
    whole grid with one seed before it starts on the next seed. Within a
    seed the order is grid, learning rate, batch size, then the schedules.

    Raises:
        ValueError: if the study is invalid (see `check_study`).
    """
    check_study(study)
    specs = {}
    seeds = _ordered_union(grid.seeds for grid in study.grids)
    for seed in seeds:
        for grid in study.grids:
            if seed not in grid.seeds:
                continue
            for spec in _grid_runs(grid, seed, output_dir):
                specs.setdefault(spec.name, spec)
    return list(specs.values())


def check_batch_sizes(
    specs,
    batch_sizes_field="the grid's batch_sizes",
    schedules_field="the grid's schedules",
):
    """Raise an error, before anything trains, if a run of `specs` has a
    batch size larger than its training set.

    The training-set sizes come from `tf_fisher.data.num_train_examples`,
    which reads no example.

    Args:
        specs: `RunSpec`s.
        batch_sizes_field: what sets the batch size of a fixed-size run,
            named in the error's fix.
        schedules_field: what sets the schedules, named in the error's fix.

    Raises:
        ValueError: naming the grid, the run, the batch size, the size of
            the training set and the fix.
        tf_fisher.data.DatasetNotFoundError: if a dataset is not prepared.
    """
    sizes = {}
    for spec in specs:
        config = spec.config
        key = (config.dataset, config.data_dir)
        if key not in sizes:
            sizes[key] = data.num_train_examples(*key)
        num_train = sizes[key]
        largest = max(stage.batch_size for stage in config.stages())
        if largest <= num_train:
            continue
        if config.stage_epochs is None:
            fix = f"Lower {batch_sizes_field} to at most {num_train}."
        else:
            fix = (
                f"Lower the batch sizes of the schedule {config.schedule!r} "
                f"in {schedules_field} to at most {num_train}."
            )
        raise ValueError(
            f"Invalid batch size {largest} in grid {spec.grid!r} (run "
            f"{os.path.basename(spec.name)}): the training set of "
            f"{config.dataset!r} has only {num_train} examples. {fix}"
        )


def _ordered_union(lists):
    seen = []
    for values in lists:
        seen.extend(value for value in values if value not in seen)
    return seen


def _grid_runs(grid, seed, output_dir):
    for learning_rate in grid.learning_rates:
        for batch_size in grid.batch_sizes:
            yield _fixed_run(grid, batch_size, learning_rate, seed, output_dir)
    if grid.schedules:
        for batch_size in grid.beacon_batch_sizes or grid.batch_sizes:
            yield _fixed_run(
                grid, batch_size, grid.schedule_learning_rate, seed, output_dir
            )
    for name in grid.schedules:
        yield _schedule_run(grid, name, seed, output_dir)


def _fixed_run(grid, batch_size, learning_rate, seed, output_dir):
    schedule = f"s{batch_size}"
    return _spec(
        grid, schedule, learning_rate, seed, output_dir,
        batch_sizes=(batch_size,), stage_epochs=None,
    )


def _schedule_run(grid, name, seed, output_dir):
    stages = schedules.parse_schedule(name, grid.epochs)
    return _spec(
        grid, name, grid.schedule_learning_rate, seed, output_dir,
        batch_sizes=tuple(stage.batch_size for stage in stages),
        stage_epochs=[[stage.first_epoch, stage.end_epoch] for stage in stages],
    )


def _spec(grid, schedule, learning_rate, seed, output_dir, **fields):
    name = os.path.join(grid.folder, run_name(schedule, learning_rate, seed))
    options = dict(grid.options)
    if options.get("data_dir"):
        options["data_dir"] = os.path.expanduser(options["data_dir"])
    config = run.RunConfig(
        dataset=grid.dataset,
        model=grid.model,
        epochs=grid.epochs,
        learning_rate=float(learning_rate),
        schedule=schedule,
        seed=seed,
        output_dir=os.path.join(output_dir, name),
        **fields,
        **options,
    )
    return RunSpec(name=name, grid=grid.folder, config=config)


def load_study(spec):
    """Load a study from a configuration module and return it.

    Args:
        spec: a file path ("experiments/configs/mnist5k_cpu.py"), a module
            name ("experiments.configs.mnist5k_cpu") or the name of a module
            in `experiments.configs` ("mnist5k_cpu"). The module must define
            `get_study()`, which returns a `Study`.

    Raises:
        ValueError: if the module is not found or its study is invalid.
        TypeError: if the module has no `get_study`, or it returns no
            `Study`.
    """
    module = _import_config(spec)
    get_study = getattr(module, "get_study", None)
    if not callable(get_study):
        raise TypeError(
            f"Configuration {spec!r} defines no get_study() function. "
            "Define get_study() returning an experiments.study.Study."
        )
    study = get_study()
    check_study(study)
    return study


def _import_config(spec):
    if spec.endswith(".py"):
        if not os.path.isfile(spec):
            raise ValueError(f"Configuration file not found: {spec!r}.")
        name = os.path.splitext(os.path.basename(spec))[0]
        module_spec = importlib.util.spec_from_file_location(name, spec)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module
    candidates = [spec] if "." in spec else [f"experiments.configs.{spec}"]
    for name in candidates:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name is not None and not name.startswith(error.name):
                raise
    raise ValueError(
        f"Configuration {spec!r} not found. Pass a file path, a module name, "
        f"or one of: {', '.join(available_configs())}."
    )


def available_configs():
    """Return the names of the configuration modules in experiments/configs."""
    folder = os.path.join(os.path.dirname(__file__), "configs")
    return sorted(
        name[:-3]
        for name in os.listdir(folder)
        if name.endswith(".py") and not name.startswith("_")
    )
