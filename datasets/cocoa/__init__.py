"""TFDS builder package (see README.md)."""
