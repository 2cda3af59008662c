"""The local web app (``convscope serve``): FastAPI routes in ``app``, cached state in ``state``."""
