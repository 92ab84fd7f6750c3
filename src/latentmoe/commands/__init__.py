"""Subcommands of the `latentmoe` CLI: each module defines `register(subparsers)`."""
