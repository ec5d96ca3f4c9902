"""Architecture adapters, model loading and built-in model names."""
