"""dinopipe: DINOv3 features and training targets for 3D EM segmentation.

Axis order everywhere is (z, y, x), channels first; physical units are nanometres.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dinopipe")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
