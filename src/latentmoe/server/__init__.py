"""The OpenAI-compatible server (`latentmoe serve`): `create_app(engine, served_model_name, api_keys, limits)`."""

from .app import create_app
from .limits import ServerLimits

__all__ = ["create_app", "ServerLimits"]
