"""Search and serving on top of a trained model: image indexes, galleries, HTML reports, attention maps."""
