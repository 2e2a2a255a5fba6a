"""Losses: separate nn.Modules that take rank and world_size explicitly (see engine.distributed)."""
