"""The installed distribution's version (a leaf: the export records it, ``--version`` prints it)."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("dsm-export")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"
