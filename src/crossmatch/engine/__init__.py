"""Training engine: Trainer loop, checkpoints, optimisers, logging, distributed helpers."""
