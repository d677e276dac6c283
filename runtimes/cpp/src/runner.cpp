// The denoising loop of runtime/denoise.py and runtime/artifact.py, over AOTInductor packages.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <set>
#include <tuple>
#include <unordered_map>

#include "manifest.h"
#include "postdiff/runner.h"
#include "scheduler_table.h"
#include "transition.h"

namespace postdiff {
namespace {

// Per-image inputs beside the text (runtime/artifact.py ADDED_INPUTS): given by the caller, or filled in below.
const std::vector<std::string> kAdded = {"text_embeds", "time_ids", "resolution", "aspect_ratio",
                                         "encoder_attention_mask", "timestep_cond", "pooled_projections",
                                         "guidance"};

// The family's pipeline default guidance scale (models/families.py FamilySpec.default_guidance).
double default_guidance(const std::string& family, const std::string& path) {
  static const std::map<std::string, double> scales = {
      {"sd15", 7.5},     {"sd2", 7.5},      {"sdxl", 7.5}, {"pixart_alpha", 7.5}, {"scenes32", 7.5},
      {"scenes64", 7.5}, {"lcm_sd15", 8.5}, {"lcm_sdxl", 8.5}, {"sd3", 7.0},  {"flux", 3.5},         {"flux_schnell", 0.0}};
  auto found = scales.find(family);
  if (found == scales.end())
    throw Error("no default guidance scale for family " + family + " (source.family); give one (--guidance-scale)",
                path);
  return found->second;
}

// FLUX's rotary positions for a latent h x w (capture.flux_position_ids): (0, row, column) per packed 2x2 patch.
torch::Tensor flux_position_ids(int64_t h, int64_t w) {
  const int64_t rows = h / 2, cols = w / 2;
  auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  torch::Tensor ids = torch::zeros({rows, cols, 3}, f32);
  ids.select(2, 1).copy_(torch::arange(rows, f32).unsqueeze(1).expand({rows, cols}));
  ids.select(2, 2).copy_(torch::arange(cols, f32).unsqueeze(0).expand({rows, cols}));
  return ids.reshape({rows * cols, 3});
}

torch::Dtype dtype_of(const std::string& name, const std::string& path) {
  if (name == "float32") return torch::kFloat32;
  if (name == "float16") return torch::kFloat16;
  if (name == "bfloat16") return torch::kBFloat16;
  throw Error("malformed manifest: unknown denoiser dtype " + name, path);
}

std::string shape_text(c10::IntArrayRef shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

// diffusers' get_guidance_scale_embedding, in its order of operations (runtime/conditioning.py).
torch::Tensor guidance_embedding(double guidance_scale, int64_t dim) {
  torch::Tensor w = torch::tensor({static_cast<float>(guidance_scale - 1.0)}) * 1000.0;
  const int64_t half = dim / 2;
  torch::Tensor freqs = torch::exp(torch::arange(half, torch::kFloat32) *
                                   -(torch::log(torch::tensor(10000.0f)) / static_cast<double>(half - 1)));
  torch::Tensor angles = w.unsqueeze(1) * freqs.unsqueeze(0);
  torch::Tensor emb = torch::cat({torch::sin(angles), torch::cos(angles)}, 1);
  if (dim % 2) emb = torch::constant_pad_nd(emb, {0, 1});
  return emb;
}

struct Variant {
  VariantEntry entry;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
};

}  // namespace

class ArtifactImpl {
 public:
  Manifest manifest;
  torch::Dtype dtype = torch::kFloat32;
  torch::Device device = torch::kCPU;
  std::map<std::string, Variant> variants;
  // ControlNet packages by (net, batch, latent h, latent w), and the control images by net
  std::map<std::tuple<int, int64_t, int64_t, int64_t>, Variant> controlnets;
  std::vector<TensorSpec> first_inputs;
  bool cfg = false;
  TensorMap weights;   // format 2: every package's constants, by state-dict name, used in place by the packages

  // Each package gets its constants from the one weights file (AOTInductor's load_constants, by the names the
  // package asks for; the graphs hold the denoiser under "denoiser."), on the runner's device, without a copy.
  void bind_weights() {
    for (auto& [name, tensor] : read_safetensors(manifest.weights)) weights[name] = tensor.to(device);
    std::vector<Variant*> all;
    for (auto& [id, variant] : variants) all.push_back(&variant);
    for (auto& [key, graph] : controlnets) all.push_back(&graph);
    for (Variant* each : all) {
      Variant& variant = *each;
      std::unordered_map<std::string, at::Tensor> constants;
      for (const std::string& fqn : variant.loader->get_constant_fqns()) {
        const std::string key = fqn.rfind("denoiser.", 0) == 0 ? fqn.substr(9) : fqn;
        auto found = weights.find(key);
        if (found == weights.end())
          throw Error("the package's constant " + key + " is not in the weights file", variant.entry.package);
        constants[fqn] = found->second;
      }
      try {
        variant.loader->load_constants(constants, false, true, true);
      } catch (const std::exception& err) {
        throw Error(std::string("AOTInductor cannot take the weights: ") + err.what(), variant.entry.package);
      }
    }
  }

  const TensorSpec& input_spec(const std::string& name) const {
    for (const auto& spec : first_inputs)
      if (spec.name == name) return spec;
    throw Error("the artifact has no input " + name, manifest.path);
  }
  bool has_input(const std::string& name) const {
    for (const auto& spec : first_inputs)
      if (spec.name == name) return true;
    return false;
  }

  // One image's tensor [1, ...] of the shape the variants take (batch 1), in the artifact's dtype.
  torch::Tensor checked(const std::string& key, const TensorMap& inputs, const std::string& spec_name) const {
    auto found = inputs.find(key);
    std::vector<int64_t> want = input_spec(spec_name).shape;
    want[0] = 1;
    if (found == inputs.end())
      throw Error("the artifact needs " + key + " of shape " + shape_text(want) + " in the inputs");
    if (found->second.sizes().vec() != want)
      throw Error(key + " must have shape " + shape_text(want) + " (one image per call; the artifact was compiled "
                  "for these sizes), got " + shape_text(found->second.sizes()));
    return found->second.to(device, dtype);
  }

  torch::Tensor run(const TensorMap& inputs, const RunOptions& options) const;
  // The ControlNets' summed residuals of one step, by the variants' input names (runtime/artifact_controlnet.py).
  TensorMap residuals(const PlanStep& step, const TensorMap& values, const std::vector<torch::Tensor>& images,
                      const RunOptions& options) const;
  torch::Tensor denoise(const torch::Tensor& embeds, const torch::Tensor& negative, const TensorMap& added,
                        const TensorMap& negative_added, double guidance, const RunOptions& options,
                        const std::vector<torch::Tensor>& images) const;
  std::vector<torch::Tensor> control_images(const TensorMap& inputs, const RunOptions& options) const;
};

Artifact::Artifact(std::unique_ptr<ArtifactImpl> impl) : impl_(std::move(impl)) {}
Artifact::~Artifact() = default;
Artifact::Artifact(Artifact&&) noexcept = default;
Artifact& Artifact::operator=(Artifact&&) noexcept = default;
int Artifact::steps() const { return impl_->manifest.steps; }

std::vector<std::string> Artifact::input_names() const {
  std::vector<std::string> names = {"prompt_embeds"};
  if (impl_->cfg) names.push_back("negative_prompt_embeds");
  for (const auto& name : kAdded)
    if (impl_->has_input(name)) names.push_back(name);
  for (int n = 0; n < impl_->manifest.controlnets; ++n)
    names.push_back(n ? "control_image_" + std::to_string(n) : "control_image");
  return names;
}

Artifact Artifact::open(const std::string& folder, const std::string& device) {
  auto impl = std::make_unique<ArtifactImpl>();
  if (device != "cpu" && device != "cuda") throw Error("unknown device " + device + " (cpu or cuda)");
  impl->manifest = read_manifest(folder, device);
  impl->device = torch::Device(device);
  impl->dtype = dtype_of(impl->manifest.dtype, impl->manifest.path);
  impl->first_inputs = impl->manifest.variants.front().inputs;
  for (const auto& step : impl->manifest.plan) impl->cfg = impl->cfg || step.cfg;
  for (const auto& entry : impl->manifest.variants) {
    Variant v{entry, nullptr};
    try {
      v.loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(entry.package);
    } catch (const std::exception& err) {
      throw Error(std::string("AOTInductor cannot load the package: ") + err.what(), entry.package);
    }
    impl->variants.emplace(entry.id, std::move(v));
  }
  for (const auto& graph : impl->manifest.controlnet_graphs) {
    Variant v{graph.entry, nullptr};
    try {
      v.loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(graph.entry.package);
    } catch (const std::exception& err) {
      throw Error(std::string("AOTInductor cannot load the package: ") + err.what(), graph.entry.package);
    }
    impl->controlnets.emplace(std::make_tuple(graph.net, graph.batch, graph.latent.first, graph.latent.second),
                              std::move(v));
  }
  if (!impl->manifest.weights.empty()) impl->bind_weights();
  return Artifact(std::move(impl));
}

torch::Tensor Artifact::run(const TensorMap& inputs, const RunOptions& options) const {
  return impl_->run(inputs, options);
}

torch::Tensor ArtifactImpl::run(const TensorMap& inputs, const RunOptions& options) const {
  at::NoGradGuard no_grad;
  const Manifest& m = manifest;
  const double guidance =
      options.guidance_scale ? *options.guidance_scale : default_guidance(m.family, m.path);

  torch::Tensor embeds = checked("prompt_embeds", inputs, "encoder_hidden_states");
  torch::Tensor negative = cfg ? checked("negative_prompt_embeds", inputs, "encoder_hidden_states") : embeds;
  // Added conditioning: what the caller gives, else the defaults the Python runner fills in.
  TensorMap given = {
      {"time_ids", torch::tensor({{static_cast<float>(m.height), static_cast<float>(m.width), 0.f, 0.f,
                                   static_cast<float>(m.height), static_cast<float>(m.width)}})},
      {"resolution", torch::tensor({{static_cast<float>(m.height), static_cast<float>(m.width)}})},
      {"aspect_ratio", torch::tensor({{static_cast<float>(m.height) / static_cast<float>(m.width)}})}};
  if (has_input("timestep_cond")) given["timestep_cond"] = guidance_embedding(guidance, input_spec("timestep_cond").shape[1]);
  if (has_input("guidance"))   // FLUX-dev's guidance embedding takes the scale itself
    given["guidance"] = torch::full({1}, static_cast<float>(guidance), torch::TensorOptions().dtype(torch::kFloat32));
  std::set<std::string> shared;
  for (const auto& [name, value] : given) shared.insert(name);
  for (const auto& [name, value] : inputs) given[name] = value;
  TensorMap added, negative_added;
  for (const auto& name : kAdded) {
    if (!has_input(name)) continue;
    added[name] = checked(name, given, name);
    // Without CFG the negative half only feeds the steps that read the cross-attention cache, where it is the
    // positive one; with CFG the shared defaults carry over and prompt-derived tensors must be given.
    TensorMap negative_given;
    if (inputs.count("negative_" + name)) negative_given["negative_" + name] = inputs.at("negative_" + name);
    else if (!cfg || shared.count(name)) negative_given["negative_" + name] = given.at(name);
    negative_added[name] = checked("negative_" + name, negative_given, name);
  }

  const std::vector<torch::Tensor> images = control_images(inputs, options);
  try {
    return denoise(embeds, negative, added, negative_added, guidance, options, images);
  } catch (const Error& err) {
    if (!err.file.empty()) throw;
    throw Error(err.what(), m.path);   // inputs were checked above: what fails now comes from the manifest
  }
}

std::vector<torch::Tensor> ArtifactImpl::control_images(const TensorMap& inputs, const RunOptions& options) const {
  const Manifest& m = manifest;
  std::vector<torch::Tensor> images;
  for (const auto* list : {&options.controlnet_scales, &options.control_guidance_start, &options.control_guidance_end})
    if (list->size() > 1 && static_cast<int>(list->size()) != m.controlnets)
      throw Error("give one ControlNet scale, guidance start and end for every ControlNet or one per ControlNet (" +
                  std::to_string(m.controlnets) + "), got " + std::to_string(list->size()));
  for (int n = 0; n < m.controlnets; ++n) {
    const std::string key = n ? "control_image_" + std::to_string(n) : "control_image";
    int64_t channels = 3;
    for (const auto& graph : m.controlnet_graphs)
      for (const auto& spec : graph.entry.inputs)
        if (graph.net == n && spec.name == "controlnet_cond") channels = spec.shape[1];
    const std::vector<int64_t> want = {1, channels, m.height, m.width};
    auto found = inputs.find(key);
    if (found == inputs.end())
      throw Error("the artifact was compiled with " + std::to_string(m.controlnets) + " ControlNet(s): it needs " +
                  key + " of shape " + shape_text(want) + " in the inputs");
    if (found->second.sizes().vec() != want)
      throw Error(key + " must have shape " + shape_text(want) + " (the artifact's resolution, values in [0, 1]), "
                  "got " + shape_text(found->second.sizes()));
    images.push_back(found->second.to(torch::kFloat32));   // as the image processor's output, before the dtype
  }
  return images;
}

TensorMap ArtifactImpl::residuals(const PlanStep& step, const TensorMap& values, const std::vector<torch::Tensor>& images,
                                  const RunOptions& options) const {
  const double steps = static_cast<double>(manifest.plan.size());
  auto pick = [](const std::vector<double>& list, int n, double fallback) {
    return list.empty() ? fallback : list.size() == 1 ? list[0] : list[n];
  };
  const torch::Tensor& x = values.at(first_inputs.front().name);
  TensorMap total;
  for (int n = 0; n < manifest.controlnets; ++n) {
    // the guidance window's keep factor, in the pipeline's arithmetic
    const bool off = step.index / steps < pick(options.control_guidance_start, n, 0.0) ||
                     (step.index + 1) / steps > pick(options.control_guidance_end, n, 1.0);
    const double scale = pick(options.controlnet_scales, n, 1.0) * (1.0 - (off ? 1.0 : 0.0));
    auto found = controlnets.find(std::make_tuple(n, x.size(0), x.size(2), x.size(3)));
    if (found == controlnets.end())
      throw Error("the artifact has no graph of ControlNet " + std::to_string(n) + " for batch " +
                  std::to_string(x.size(0)) + " at latent " + std::to_string(x.size(2)) + "x" +
                  std::to_string(x.size(3)), manifest.path);
    const Variant& graph = found->second;
    std::vector<torch::Tensor> feed;
    for (const auto& spec : graph.entry.inputs) {
      if (spec.name == "controlnet_cond") {
        feed.push_back(images[n].contiguous());
        continue;
      }
      auto value = values.find(spec.name);
      if (value == values.end())
        throw Error("ControlNet graph " + graph.entry.id + " needs input " + spec.name, manifest.path);
      feed.push_back(value->second.contiguous());
    }
    std::vector<torch::Tensor> outputs = graph.loader->run(feed);
    if (outputs.size() != graph.entry.outputs.size())
      throw Error("package " + graph.entry.id + " returned " + std::to_string(outputs.size()) + " outputs, the "
                  "manifest lists " + std::to_string(graph.entry.outputs.size()), graph.entry.package);
    for (size_t k = 0; k < outputs.size(); ++k) {   // summed over the ControlNets in order, as MultiControlNetModel
      const std::string& name = graph.entry.outputs[k].name;
      torch::Tensor scaled = outputs[k] * scale;
      total[name] = n == 0 ? scaled : total.at(name) + scaled;
    }
  }
  return total;
}

torch::Tensor ArtifactImpl::denoise(const torch::Tensor& embeds, const torch::Tensor& negative, const TensorMap& added,
                                    const TensorMap& negative_added, double guidance, const RunOptions& options,
                                    const std::vector<torch::Tensor>& images) const {
  const Manifest& m = manifest;
  const std::string latent_input = first_inputs.front().name;
  const int64_t channels = first_inputs.front().shape[1];
  at::Generator generator = at::detail::createCPUGenerator(options.seed);
  const std::vector<int64_t> start =
      m.transition ? m.transition->low : std::vector<int64_t>{m.latent_height, m.latent_width};
  torch::Tensor latents =
      torch::randn({1, channels, start[0], start[1]}, generator, torch::TensorOptions().dtype(dtype)) *
      m.init_noise_sigma;
  latents = latents.to(device);
  SchedulerState scheduler;
  std::map<std::string, torch::Tensor> caches;
  // Inputs that depend on the step's latent size only, made once per size (FLUX's txt_ids and img_ids; at low
  // resolution the low grid's own positions, as runtime/artifact.py shared_inputs).
  std::map<std::pair<int64_t, int64_t>, TensorMap> shared;
  // The control images at each latent size, doubled for CFG steps: resized (nearest) from the given full-size ones,
  // as diffusers' VaeImageProcessor resizes a tensor, then cast to the artifact's dtype.
  std::map<std::pair<std::pair<int64_t, int64_t>, bool>, std::vector<torch::Tensor>> prepared;
  for (size_t i = 0; i < m.plan.size(); ++i) {
    const auto began = std::chrono::steady_clock::now();
    const PlanStep& step = m.plan[i];
    const TableRow& row = m.table[i];
    const Variant& variant = variants.at(step.variant_id);
    torch::Tensor x = step.cfg ? torch::cat({latents, latents}) : latents;
    if (row.input_scale != 1.0) x = x * row.input_scale;
    const TensorMap* cond = &added;
    torch::Tensor context = embeds;
    if (step.cfg) {
      context = torch::cat({negative, embeds});
    } else if (step.reads_cross_attn) {
      context = negative;   // as T-GATE after its gate step: every attn2 reads the cache
      cond = &negative_added;
    }
    TensorMap values = {{latent_input, x},
                        {"timestep", torch::full({x.size(0)}, static_cast<float>(row.timestep),
                                                 torch::TensorOptions().dtype(torch::kFloat32).device(device))},
                        {"encoder_hidden_states", context}};
    for (const auto& [name, value] : *cond)
      values[name] = step.cfg ? torch::cat({negative_added.at(name), added.at(name)}) : value;
    const std::pair<int64_t, int64_t> size{x.size(2), x.size(3)};
    if (!shared.count(size)) {
      TensorMap made;
      if (has_input("txt_ids"))
        made["txt_ids"] = torch::zeros({embeds.size(1), 3}, torch::TensorOptions().dtype(dtype).device(device));
      if (has_input("img_ids")) made["img_ids"] = flux_position_ids(size.first, size.second).to(device, dtype);
      shared[size] = made;
    }
    for (const auto& [name, value] : shared.at(size)) values[name] = value;
    for (const auto& [name, value] : caches) values[name] = value;
    if (m.controlnets) {
      const auto key = std::make_pair(size, step.cfg);
      if (!prepared.count(key)) {
        std::vector<torch::Tensor> made;
        const int64_t factor = m.height / m.latent_height;
        for (const auto& image : images) {
          torch::Tensor resized = size.first == m.latent_height && size.second == m.latent_width
                                      ? image
                                      : at::upsample_nearest2d(image, {size.first * factor, size.second * factor});
          resized = resized.to(device, dtype);
          made.push_back(step.cfg ? torch::cat({resized, resized}) : resized);
        }
        prepared[key] = made;
      }
      for (const auto& [name, value] : residuals(step, values, prepared.at(key), options)) values[name] = value;
    }
    std::vector<torch::Tensor> feed;
    for (const auto& spec : variant.entry.inputs) {
      auto found = values.find(spec.name);
      if (found == values.end())
        throw Error("step " + std::to_string(step.index) + " (" + step.variant_id + ") needs input " + spec.name +
                        ", which no earlier step wrote",
                    m.path);
      if (found->second.sizes().vec() != spec.shape)
        throw Error("step " + std::to_string(step.index) + ": input " + spec.name + " has shape " +
                        shape_text(found->second.sizes()) + ", the package takes " + shape_text(spec.shape),
                    m.path);
      feed.push_back(found->second.contiguous());   // the compiled code assumes the traced (contiguous) strides
    }
    const auto called = std::chrono::steady_clock::now();
    std::vector<torch::Tensor> outputs = variant.loader->run(feed);
    const auto returned = std::chrono::steady_clock::now();
    if (outputs.size() != variant.entry.outputs.size())
      throw Error("package " + variant.entry.id + " returned " + std::to_string(outputs.size()) + " outputs, the "
                  "manifest lists " + std::to_string(variant.entry.outputs.size()), variant.entry.package);
    for (size_t k = 1; k < outputs.size(); ++k) {
      const std::string& name = variant.entry.outputs[k].name;
      // A variant serving several steps returns every cache any of them writes; a step keeps those it writes.
      if (std::find(step.writes.begin(), step.writes.end(), name.substr(0, name.find(':'))) == step.writes.end())
        continue;
      torch::Tensor value = outputs[k];
      if (step.cfg && name.rfind("cross_attn:", 0) == 0) {
        auto halves = value.chunk(2);
        if (m.cross_attn_cache == "cond") value = halves[1];
        else if (m.cross_attn_cache == "ave") value = (halves[0] + halves[1]) / 2;
        else if (m.cross_attn_cache == "cfg") value = halves[0] + guidance * (halves[1] - halves[0]);
        else throw Error("the plan writes the cross-attention cache from a CFG batch, but config.cross_attn_cache "
                         "is " + m.cross_attn_cache, m.path);
      }
      caches[name] = value;
    }
    torch::Tensor noise = outputs[0];
    if (step.cfg) {
      auto halves = noise.chunk(2);
      noise = halves[0] + guidance * (halves[1] - halves[0]);
    }
    if (noise.size(1) == 2 * latents.size(1)) noise = noise.chunk(2, 1)[0];   // learned variance (PixArt)
    if (row.transition) {
      latents = transition(*m.transition, latents, noise, generator);
      resize_caches(caches, *m.transition);
      scheduler.restart();
    } else {
      latents = scheduler.step(row, latents, noise, generator, dtype).to(dtype);
    }
    if (options.print_step_times) {
      using ms = std::chrono::duration<double, std::milli>;
      std::fprintf(stderr, "step %d %s %.3f ms (package %.3f ms)\n", step.index, step.variant_id.c_str(),
                   ms(std::chrono::steady_clock::now() - began).count(), ms(returned - called).count());
    }
  }
  return latents;
}

}  // namespace postdiff
