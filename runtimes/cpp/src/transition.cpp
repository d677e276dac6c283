#include "transition.h"

#include <cmath>

#include "postdiff/runner.h"

namespace postdiff {
namespace {

torch::Tensor upsample(const torch::Tensor& x, int64_t h, int64_t w) {
  namespace F = torch::nn::functional;
  return F::interpolate(x, F::InterpolateFuncOptions().size(std::vector<int64_t>{h, w}).mode(torch::kBilinear)
                               .align_corners(false));
}

}  // namespace

torch::Tensor transition(const TransitionSpec& spec, const torch::Tensor& latents, const torch::Tensor& model_output,
                         at::Generator& generator) {
  const double a = spec.alpha_bar_t, an = spec.alpha_bar_next;
  const int64_t H = spec.full[0], W = spec.full[1];
  torch::Tensor noise;
  if (spec.renoise == "fresh")   // drawn before the arithmetic, as the Python runner does
    noise = torch::randn({latents.size(0), latents.size(1), H, W}, generator,
                         torch::TensorOptions().dtype(latents.scalar_type()))
                .to(latents.device());
  else if (spec.renoise != "predicted")
    throw Error("unknown transition renoise mode " + spec.renoise);
  torch::Tensor sample = spec.sigma_space ? latents * std::sqrt(a) : latents;   // sigma space -> x_t
  torch::Tensor x = sample.to(torch::kFloat32), out = model_output.to(latents.scalar_type()).to(torch::kFloat32);
  torch::Tensor x0, eps;
  if (spec.prediction_type == "epsilon") {
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
  torch::Tensor full = (std::sqrt(an) * x0_up + std::sqrt(1 - an) * noise.to(torch::kFloat32)).to(latents.scalar_type());
  return spec.sigma_space ? full * (1.0 / std::sqrt(an)) : full;
}

void resize_caches(std::map<std::string, torch::Tensor>& caches, const TransitionSpec& spec) {
  for (auto it = caches.begin(); it != caches.end();) {
    if (it->first.rfind("cross_attn:", 0) != 0) {
      it = caches.erase(it);
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
