"""The caches' names, defined once: in the plan's reads and writes, in variant inputs and outputs, and in the
runtime's cache dict (where the cross-attention cache has one entry per attn2 module, `cross_attn:<path>`)."""

DEEPCACHE = "deepcache"     # DeepCache's deep feature (U-Nets); the block cache's residual (transformers)
CROSS_ATTN = "cross_attn"   # the attn2 outputs a CFG step writes for the steps without CFG
