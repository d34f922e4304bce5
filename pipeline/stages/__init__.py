"""One module per command; each has a config dataclass and a ``run(config)`` entry."""
