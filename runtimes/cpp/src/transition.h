// The switch from low to full resolution (docs/manifest.md "The transition"; kernels/transition_ref.py).
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>

#include "manifest.h"

namespace postdiff {

// The full-resolution latents from the last low-resolution step's latents and guided model output.
torch::Tensor transition(const TransitionSpec& spec, const torch::Tensor& latents, const torch::Tensor& model_output,
                         at::Generator& generator);

// Cross-attention caches [B, tokens, C] back to their grid, upsampled to the same level of the full latent;
// every other cache (DeepCache) is dropped.
void resize_caches(std::map<std::string, torch::Tensor>& caches, const TransitionSpec& spec);

}  // namespace postdiff
