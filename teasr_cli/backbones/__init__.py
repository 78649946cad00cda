"""Backbone adapters that answer the native call `v = model(z_t, t_cur, z_lq, t_tar)`."""
from __future__ import annotations

from teasr_cli.errors import ModelError


def load_backbone(name: str, folder, config: dict):
    if name == "qwen-image":
        from teasr_cli.backbones.qwen_image import load_pretrained
        return load_pretrained(folder, config)
    raise ModelError(f"unknown backbone {name!r} in {folder}/config.json (known: native, qwen-image)")
