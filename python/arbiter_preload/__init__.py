"""arbiterd's reference --preload template for Python: load a WSGI or ASGI
application once, fork the workers from it (docs/workers.md, "Preloading")."""

__version__ = "0.1.0"

from .worker_env import recycle  # noqa: F401  (arbiter_preload.recycle())
