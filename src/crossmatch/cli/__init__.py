"""Command line interface: the only layer that reads flags."""
