"""steerdiff: diffusion samplers and guidance methods for Hugging Face diffusers."""

__version__ = "0.1.0"
