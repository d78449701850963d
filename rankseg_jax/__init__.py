"""rankseg_jax: Segmenter and Segmenter + RankSeg in JAX/Flax."""

__version__ = "0.1.0"
