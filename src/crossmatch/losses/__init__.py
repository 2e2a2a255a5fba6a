"""Losses: separate nn.Modules that take rank and world_size explicitly (collectives in crossmatch.tensors)."""
