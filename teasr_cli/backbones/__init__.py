"""Backbones: one module per model family, each defining BACKBONE (the folders.Backbone interface) and answering
the native call `v = model(z_t, t_cur, z_lq, t_tar)`. folders.BACKBONES maps config.json's `backbone` to them."""
