"""The HTTP gateway and engine of rfserve."""
from importlib.metadata import version

__version__ = version("rfserve")
