"""HTTP service and web page for bonefrac (needs the ``[serve]`` extra: FastAPI + uvicorn).

    from bonefrac.serving import create_app
    app = create_app("path/to/model")   # then serve with uvicorn, or run `bonefrac serve`

``create_app`` is imported on first use, so the stdlib-only parts (``serving.auth`` tokens,
``serving.audit`` log) work without the extra: ``bonefrac token`` and ``bonefrac audit``.
"""

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from bonefrac.serving.app import create_app

        return create_app
    raise AttributeError(f"module 'bonefrac.serving' has no attribute {name!r}")
