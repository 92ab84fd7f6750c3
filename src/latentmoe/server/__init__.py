"""The OpenAI-compatible server (`latentmoe serve`): `create_app(engine, served_model_name, api_keys)`."""

from .app import create_app

__all__ = ["create_app"]
