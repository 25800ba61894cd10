"""Data: stimulus images (embedded or the user's), and the studies built on them."""

from .images import EMBEDDED_SOURCES, ImageSet, load_embedded, load_folder

__all__ = ["EMBEDDED_SOURCES", "ImageSet", "load_embedded", "load_folder"]
