"""One module per stage: a config dataclass and run(config, storage) -> result."""
