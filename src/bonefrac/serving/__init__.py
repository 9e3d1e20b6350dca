"""HTTP service and web page for bonefrac (needs the ``[serve]`` extra: FastAPI + uvicorn).

    from bonefrac.serving import create_app
    app = create_app("path/to/model")   # then serve with uvicorn, or run `bonefrac serve`
"""

from bonefrac.serving.app import create_app

__all__ = ["create_app"]
