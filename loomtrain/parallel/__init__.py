"""One module per parallelism, each an `apply_*` over a module and a mesh; `compose` fixes the order."""
