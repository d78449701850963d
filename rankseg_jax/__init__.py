"""rankseg_jax: Segmenter and Segmenter + RankSeg in JAX/Flax."""

__version__ = "0.1.0"

from rankseg_jax.segmentor import Segmentor  # noqa: E402

__all__ = ["Segmentor", "__version__"]
