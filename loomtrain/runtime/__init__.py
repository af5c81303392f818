"""The training runtime: Trainer, step, mesh, model building, data, metrics and pre-flight checks."""
