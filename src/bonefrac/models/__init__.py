"""Models: a registry of named backbones behind one :func:`create_model` entry point (torch)."""

from bonefrac.models.net import FractureNet, Head, load_member
from bonefrac.models.registry import create_model, list_models, register_model

__all__ = ["FractureNet", "Head", "create_model", "list_models", "load_member",
           "register_model"]
