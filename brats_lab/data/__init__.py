"""The data layer: case discovery, validation, phantoms, preprocessing and the cache."""
