"""rfserve: an inference server for rectified-flow image generators and unified multimodal models.

Everything the distribution installs lives under this one import name (`rfserve.server`, `rfserve.kernels`,
`rfserve.model_zoo`, `rfserve.benchmarks`): generic top-level names collide with other distributions, as
`kernels` did with Hugging Face's package of that name, which transformers requires."""
from importlib.metadata import version

__version__ = version("rfserve")
