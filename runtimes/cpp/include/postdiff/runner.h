// Run a postdiff-compile artifact from C++: text embeddings in, latents out.
//
//   postdiff::Artifact artifact = postdiff::Artifact::open("out/sd15-fast");   // validates everything
//   postdiff::TensorMap inputs = postdiff::read_safetensors("embeddings.safetensors");
//   torch::Tensor latents = artifact.run(inputs, {/*seed=*/0});
//
// The artifact must have been compiled with --format aoti (AOTInductor packages) by the torch whose
// libtorch this program links, and its scheduler must have a coefficient table (docs/manifest.md).
#pragma once

// torch/types.h (ATen and the tensor factories), not torch/torch.h: the nn/optim/data frontend doubled
// every file's compile time (measured: 9 s against 20 s just to parse, per file).
#include <torch/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace postdiff {

// Bad input: a malformed or tampered artifact, a missing file, wrong tensors. `file` names the culprit.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message, const std::string& file = "");
  const std::string file;
};

using TensorMap = std::map<std::string, torch::Tensor>;

// safetensors files: the embeddings the Python CLI takes (`postdiff-compile run --embeddings`), latents out.
TensorMap read_safetensors(const std::string& path);
// Written to `path`.tmp and renamed into place when complete.
void write_safetensors(const std::string& path, const TensorMap& tensors);

struct RunOptions {
  uint64_t seed = 0;   // a CPU generator, as the Python runner's torch.Generator("cpu").manual_seed(seed); on CUDA
                       // too (the Python runner then draws on the GPU, so the two differ there)
  std::optional<double> guidance_scale;   // default: the family's pipeline default (7.5; LCM 8.5, SD3 7.0, FLUX 3.5)
  bool print_step_times = false;          // one line per step on stderr
  // An artifact compiled with ControlNets: per ControlNet (one value: every ControlNet) the conditioning scale and
  // the guidance window, as StableDiffusionControlNetPipeline's controlnet_conditioning_scale (default 1) and
  // control_guidance_start / control_guidance_end (0 and 1).
  std::vector<double> controlnet_scales, control_guidance_start, control_guidance_end;
};

class ArtifactImpl;

class Artifact {
 public:
  // Validates the manifest (checksum, format version, fields), every package's size and sha256, the
  // torch version and device the packages were compiled for, then loads the packages.
  static Artifact open(const std::string& folder, const std::string& device = "cpu");
  ~Artifact();
  Artifact(Artifact&&) noexcept;
  Artifact& operator=(Artifact&&) noexcept;

  // Inputs by name: prompt_embeds [1, L, D], negative_prompt_embeds (classifier-free guidance), added
  // conditioning (SDXL text_embeds, PixArt encoder_attention_mask, SD3/FLUX pooled_projections, ...) and
  // negative_<name> for the negative half. What the pipelines derive is filled in (SDXL time_ids, PixArt
  // resolution and aspect ratio, LCM's guidance embedding, FLUX's guidance and its txt_ids/img_ids per latent
  // size). An artifact compiled with ControlNets takes control_image (and control_image_1, ... for the others):
  // [1, 3, height, width] in [0, 1] at the artifact's resolution, resized (nearest) for low-resolution steps as
  // diffusers' image processor resizes a tensor. Returns the final latents [1, C, H, W] in the artifact's dtype.
  torch::Tensor run(const TensorMap& inputs, const RunOptions& options = {}) const;

  int steps() const;
  std::vector<std::string> input_names() const;   // what run() reads from `inputs`

 private:
  explicit Artifact(std::unique_ptr<ArtifactImpl> impl);
  std::unique_ptr<ArtifactImpl> impl_;
};

}  // namespace postdiff
