// The switch from low to full resolution (docs/manifest.md "The transition"; kernels/transition_ref.py).
#pragma once

#include <torch/types.h>

#include <map>
#include <string>

#include "manifest.h"

namespace postdiff {

// The full-resolution latents from the last low-resolution step's latents and guided model output: x0 (and the
// noise) from the output by the prediction type (epsilon, v_prediction, sample; flow: the velocity at sigma_t),
// x0 upsampled, re-noised to the next level, all in float32, returned in the latents' dtype.
torch::Tensor transition(const TransitionSpec& spec, const torch::Tensor& latents, const torch::Tensor& model_output,
                         at::Generator& generator);

// The attn2 outputs of the cross-attention cache (`cross_attn:<path>.attn2`, [B, tokens, C]) back to their grid,
// upsampled to the same level of the full latent; other cross_attn entries (SD3's text keys and values and pooled
// embedding) kept as they are; every other cache (DeepCache, the block cache, the attention broadcast) dropped.
void resize_caches(std::map<std::string, torch::Tensor>& caches, const TransitionSpec& spec);

}  // namespace postdiff
