"""Process groups and the CPU path: the Layout (sizes, ranks, groups) that the rest of the package is handed,
and the only code that asks megatron-core's parallel state."""
