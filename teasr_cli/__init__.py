"""teasr: any-step diffusion-transformer x4 super-resolution (TEASR)."""

__version__ = "0.1.0"
