"""The HTTP routes, one module per group; app.py mounts them, the /v1 ones behind the API-key check."""
