"""TFDS builders of the prepared (array_record) datasets; see `builders` and data/README.md.

Importing this package is cheap; `rankseg_jax.data.tfds_builders.builders` imports
tensorflow-datasets and registers the builder names (`rankseg_<dataset>`).
"""
