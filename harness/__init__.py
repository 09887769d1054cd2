"""ftbench engine: config, the training loop, measurement, runner, records, models, tasks, CLI."""

__version__ = "0.1.0"
