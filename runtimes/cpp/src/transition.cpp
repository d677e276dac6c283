#include "transition.h"

#include <cmath>

#include "postdiff/runner.h"

namespace postdiff {
namespace {

torch::Tensor upsample(const torch::Tensor& x, int64_t h, int64_t w) {
  // What torch.nn.functional.interpolate(mode="bilinear", align_corners=False, size=...) calls.
  return at::upsample_bilinear2d(x, {h, w}, /*align_corners=*/false);
}

}  // namespace

torch::Tensor transition(const TransitionSpec& spec, const torch::Tensor& latents, const torch::Tensor& model_output,
                         at::Generator& generator) {
  const int64_t H = spec.full[0], W = spec.full[1];
  torch::Tensor noise;
  if (spec.renoise == "fresh")   // drawn before the arithmetic, as the Python runner does
    noise = torch::randn({latents.size(0), latents.size(1), H, W}, generator,
                         torch::TensorOptions().dtype(latents.scalar_type()))
                .to(latents.device());
  else if (spec.renoise != "predicted")
    throw Error("unknown transition renoise mode " + spec.renoise);
  // x = a x0 + b noise at both levels (kernels/transition_ref.py, TransitionParams.coefficients)
  double a_next, b_next;
  if (spec.flow) {
    a_next = 1.0 - spec.sigma_next;
    b_next = spec.sigma_next;
  } else {
    a_next = std::sqrt(spec.alpha_bar_next);
    b_next = std::sqrt(1 - spec.alpha_bar_next);
  }
  const double a = spec.alpha_bar_t;
  torch::Tensor sample = spec.sigma_space ? latents * std::sqrt(a) : latents;   // sigma space -> x_t
  torch::Tensor x = sample.to(torch::kFloat32), out = model_output.to(latents.scalar_type()).to(torch::kFloat32);
  torch::Tensor x0, eps;
  if (spec.flow) {   // out is the velocity noise - x0 on x_sigma = (1 - sigma) x0 + sigma noise
    x0 = x - spec.sigma_t * out;
    eps = x + (1 - spec.sigma_t) * out;
  } else if (spec.prediction_type == "epsilon") {
    x0 = (x - std::sqrt(1 - a) * out) / std::sqrt(a);
    eps = out;
  } else if (spec.prediction_type == "v_prediction") {
    x0 = std::sqrt(a) * x - std::sqrt(1 - a) * out;
    eps = std::sqrt(a) * out + std::sqrt(1 - a) * x;
  } else if (spec.prediction_type == "sample") {
    x0 = out;
    eps = (x - std::sqrt(a) * x0) / std::sqrt(1 - a);
  } else {
    throw Error("unknown prediction type " + spec.prediction_type);
  }
  if (spec.clamp_x0 > 0) x0 = x0.clamp(-spec.clamp_x0, spec.clamp_x0);
  torch::Tensor x0_up = upsample(x0, H, W);
  if (spec.renoise == "predicted") noise = upsample(eps, H, W);
  torch::Tensor full = (a_next * x0_up + b_next * noise.to(torch::kFloat32)).to(latents.scalar_type());
  return spec.sigma_space ? full * (1.0 / std::sqrt(spec.alpha_bar_next)) : full;
}

void resize_caches(std::map<std::string, torch::Tensor>& caches, const TransitionSpec& spec) {
  const std::string suffix = ".attn2";
  for (auto it = caches.begin(); it != caches.end();) {
    const std::string& name = it->first;
    if (name.rfind("cross_attn:", 0) != 0) {   // DeepCache, block cache, attention broadcast: never read across
      it = caches.erase(it);
      continue;
    }
    // Other cross-attention entries (SD3's text keys and values, its pooled text embedding) have no image tokens:
    // the same at every resolution, kept as they are.
    if (name.size() < suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
      ++it;
      continue;
    }
    torch::Tensor value = it->second;
    const int64_t batch = value.size(0), tokens = value.size(1), channels = value.size(2);
    int64_t h = spec.low[0], w = spec.low[1], H = spec.full[0], W = spec.full[1];
    while (h * w > tokens && (h > 1 || w > 1)) {   // the level whose grid holds this many tokens
      h = (h + 1) / 2;
      w = (w + 1) / 2;
      H = (H + 1) / 2;
      W = (W + 1) / 2;
    }
    if (h * w != tokens)
      throw Error("cache " + it->first + ": " + std::to_string(tokens) + " tokens are no grid of the low latent");
    torch::Tensor grid = value.transpose(1, 2).reshape({batch, channels, h, w});
    it->second = upsample(grid.to(torch::kFloat32), H, W).to(value.scalar_type()).flatten(2).transpose(1, 2).contiguous();
    ++it;
  }
}

}  // namespace postdiff
