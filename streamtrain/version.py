"""streamtrain's version: one place, which the package root, the CLI, checkpoints and the build (pyproject.toml)
read. A module of its own so that no module inside the package imports the package root for it."""

__version__ = "0.1.0"
