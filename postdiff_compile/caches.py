"""The caches' names, defined once: in the plan's reads and writes, in variant inputs and outputs, and in the
runtime's cache dict (where the cross-attention cache and the attention broadcast have one entry per module
output, `cross_attn:<path>`, `attn_broadcast:<path>`)."""

DEEPCACHE = "deepcache"     # DeepCache's deep feature (U-Nets); the block cache's residual (transformers)
# The text conditioning a CFG step writes for the steps without CFG: the attn2 outputs (U-Nets, PixArt); for SD3's
# joint blocks, the text keys and values every joint attention reads and the pooled text embedding
# (passes/joint_text.py). Entries are reduced to one half by the mode (cond, ave, cfg) where they are written.
CROSS_ATTN = "cross_attn"
# The self-attention outputs a step reuses from an earlier one (Pyramid Attention Broadcast, passes/attn_broadcast.py)
ATTN_BROADCAST = "attn_broadcast"
