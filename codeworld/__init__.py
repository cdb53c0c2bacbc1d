"""codeworld: shared mechanics of the Code World Model pipeline (config, storage, shards, tracking)."""

__version__ = "0.1.0"
