"""Layout-independent lazy asynchronous checkpoints (issue #5). Nothing here yet: the runtime
refuses checkpoint.* settings with a clear message until it lands."""
