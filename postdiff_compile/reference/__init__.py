"""The reference text-to-image model trained here (issue 8): data, text encoder, training, metrics."""
