"""`synthetic`: a benchmark-only family. Real photographs at a fixed, GPU-like pace, so the host path
(batching, encoding, HTTP) can be measured on any machine. Never a default; it makes no images of its own."""
from rfserve.model_zoo.synthetic.pipeline import SyntheticPipeline, load_synthetic

__all__ = ["SyntheticPipeline", "load_synthetic"]
