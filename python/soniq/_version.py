"""soniq.__version__ (from the installed metadata), importable without the package's __init__."""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("soniq")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"
