#include "manifest.h"

#include <torch/version.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "postdiff/runner.h"
#include "sha256.h"

namespace postdiff {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string read_text(const std::string& path, const std::string& what) {
  // The loader never follows a link out of the artifact folder (as the Python loader, manifest.member).
  if (fs::is_symlink(path)) throw Error(what + " is a symbolic link; an artifact holds its files", path);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(what + " is missing", path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// The field at a JSON pointer ("/transition/alpha_bar_t"), with its type checked: one error naming the field.
template <typename T>
T field(const json& doc, const std::string& pointer, const std::string& path) {
  try {
    return doc.at(json::json_pointer(pointer)).get<T>();
  } catch (const json::exception& err) {
    throw Error("malformed manifest: field " + pointer + ": " + err.what(), path);
  }
}

std::vector<TensorSpec> tensor_specs(const json& doc, const std::string& pointer, const std::string& path) {
  std::vector<TensorSpec> specs;
  const auto list = field<json>(doc, pointer, path);
  if (!list.is_array()) throw Error("malformed manifest: field " + pointer + " is not a list", path);
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string at = pointer + "/" + std::to_string(i);
    specs.push_back({field<std::string>(doc, at + "/name", path), field<std::vector<int64_t>>(doc, at + "/shape", path),
                     field<std::string>(doc, at + "/dtype", path)});
  }
  return specs;
}

std::string major_minor(const std::string& version) {
  const auto first = version.find('.');
  const auto second = version.find_first_of(".+", first + 1);
  return version.substr(0, second);
}

}  // namespace

void read_fields(const json& doc, Manifest& m, const std::string& device, bool verify_files);

Manifest read_manifest(const std::string& folder, const std::string& device, bool verify_files) {
  Manifest m;
  m.folder = folder;
  m.path = (fs::path(folder) / "manifest.json").string();
  if (!fs::is_directory(folder)) throw Error("no such artifact folder", folder);
  const std::string text = read_text(m.path, "the manifest");
  const std::string checksum_path = (fs::path(folder) / "manifest.sha256").string();
  const std::string checksum = read_text(checksum_path, "the manifest checksum");
  std::istringstream fields(checksum);
  std::string recorded;
  fields >> recorded;   // "<hex>  manifest.json", whitespace as sha256sum writes it (or a stray \r)
  if (recorded != sha256_hex(text))
    throw Error("does not match manifest.sha256: the manifest was edited or damaged", m.path);

  // nlohmann's parser recurses once per level: a manifest nested 100,000 deep would overflow the stack.
  // Bounded first, as the Python loader does (safe_json.py): no manifest nests more than 64 levels.
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  if (deepest > 64) throw Error("malformed manifest: nested " + std::to_string(deepest) + " levels deep", m.path);

  json doc;
  try {
    doc = json::parse(text);
  } catch (const json::exception& err) {
    throw Error(std::string("malformed manifest: not JSON (") + err.what() + ")", m.path);
  }
  if (!doc.is_object()) throw Error("malformed manifest: not a JSON object", m.path);
  try {
    read_fields(doc, m, device, verify_files);
  } catch (const json::exception& err) {   // a type the reads below did not expect
    throw Error(std::string("malformed manifest: ") + err.what(), m.path);
  }
  return m;
}

namespace {

void check_tensor_specs(const VariantEntry& v, const std::string& path) {
  if (v.inputs.size() < 3 || v.outputs.empty())
    throw Error("malformed manifest: variant " + v.id + " needs the latent, timestep and text inputs and an output",
                path);
  const std::string in = "malformed manifest: variant " + v.id + " input ";
  for (const auto& spec : v.inputs)
    if (spec.shape.empty() || spec.shape[0] < 1)
      throw Error(in + spec.name + (spec.name == "txt_ids" || spec.name == "img_ids" ? " has no rows"
                                                                                     : " has no batch dimension"),
                  path);
  if (v.inputs[0].shape.size() != 4)
    throw Error("malformed manifest: variant " + v.id + " latent input " + v.inputs[0].name + " is not 4-D", path);
  const auto& latent = v.inputs[0].shape;
  const TensorSpec* text = nullptr;
  for (const auto& spec : v.inputs)
    if (spec.name == "encoder_hidden_states") text = &spec;
  if (!text) throw Error("malformed manifest: variant " + v.id + " has no encoder_hidden_states input", path);
  if (text->shape.size() != 3) throw Error(in + "encoder_hidden_states is not 3-D", path);
  for (const auto& spec : v.inputs) {
    const size_t rank = spec.shape.size();
    if ((spec.name == "timestep_cond" || spec.name == "pooled_projections") && rank != 2)
      throw Error(in + spec.name + " is not 2-D", path);
    if (spec.name == "guidance" && rank != 1) throw Error(in + "guidance is not 1-D", path);
    // FLUX's rotary positions, made by the runner per latent size: one row per text token, one per packed 2x2
    // latent patch, each (0, row, column).
    if (spec.name == "txt_ids" && (rank != 2 || spec.shape[0] != text->shape[1] || spec.shape[1] != 3))
      throw Error(in + "txt_ids is not [" + std::to_string(text->shape[1]) + ", 3] (text length, 3)", path);
    if (spec.name == "img_ids") {
      const int64_t tokens = (latent[2] / 2) * (latent[3] / 2);
      if (latent[2] % 2 || latent[3] % 2 || rank != 2 || spec.shape[0] != tokens || spec.shape[1] != 3)
        throw Error(in + "img_ids is not [" + std::to_string(tokens) + ", 3] (one row per 2x2 patch of the " +
                        std::to_string(latent[2]) + "x" + std::to_string(latent[3]) + " latent, 3)",
                    path);
    }
  }
}

void check_table(const Manifest& m) {
  int basis = 0;   // tensors in the current segment (docs/manifest.md, "The scheduler table")
  for (size_t i = 0; i < m.table.size(); ++i) {
    const TableRow& row = m.table[i];
    const bool transition_here = m.transition && static_cast<int>(i) == m.transition->switch_step - 1;
    if (row.index != static_cast<int>(i) || row.transition != transition_here || row.noise_draws < 0)
      throw Error("malformed manifest: scheduler table row " + std::to_string(i) + " has index " +
                      std::to_string(row.index) + ", transition " + (row.transition ? "true" : "false") +
                      " (the transition row is step switch_step - 1)",
                  m.path);
    if (row.transition) {
      basis = 0;
      continue;
    }
    basis += 2 + row.noise_draws;
    for (const auto* terms : {&row.update, &row.clip_x0})
      for (const auto& [index, coefficient] : *terms)
        if (index < 0 || index >= basis)
          throw Error("malformed manifest: scheduler table row " + std::to_string(i) + " reads tensor " +
                          std::to_string(index) + " of " + std::to_string(basis),
                      m.path);
    if (row.clip && !(row.clip_range > 0))
      throw Error("malformed manifest: scheduler table row " + std::to_string(i) + " clips to a range <= 0", m.path);
  }
}

// One AOTInductor package's entry at JSON pointer `at` (a variant or a ControlNet graph): its tensors, and its file
// checked (a plain name, compiled for `device`, present, its size and sha256, the weights file it reads).
VariantEntry package_entry(const json& doc, const std::string& at, const Manifest& m, const std::string& device,
                           int version, bool verify_files) {
  VariantEntry v;
  v.id = field<std::string>(doc, at + "/id", m.path);
  v.inputs = tensor_specs(doc, at + "/inputs", m.path);
  v.outputs = tensor_specs(doc, at + "/outputs", m.path);
  check_tensor_specs(v, m.path);
  const std::string file = field<std::string>(doc, at + "/files/aoti/file", m.path);
  if (file.empty() || file.find('/') != std::string::npos || file[0] == '.' || file.size() > 200)
    throw Error("malformed manifest: file name " + file + " is not a plain name", m.path);
  const std::string built_for = field<std::string>(doc, at + "/files/aoti/device", m.path);
  if (built_for != device)
    throw Error("compiled for " + built_for + ", asked to run on " + device, (fs::path(m.folder) / file).string());
  v.package = (fs::path(m.folder) / file).string();
  if (fs::is_symlink(v.package)) throw Error("the AOTInductor package is a symbolic link", v.package);
  if (!fs::is_regular_file(v.package)) throw Error("the AOTInductor package is missing", v.package);
  const auto bytes = field<uint64_t>(doc, at + "/files/aoti/bytes", m.path);
  if (fs::file_size(v.package) != bytes)
    throw Error("has " + std::to_string(fs::file_size(v.package)) + " bytes, the manifest says " +
                    std::to_string(bytes) + ": damaged or replaced",
                v.package);
  if (verify_files && sha256_file(v.package) != field<std::string>(doc, at + "/files/aoti/sha256", m.path))
    throw Error("sha256 differs from the manifest's: damaged or replaced", v.package);
  // Format 2: the package holds no weights; it names the artifact's weights file, loaded at open.
  if (version >= 2 && field<std::string>(doc, at + "/files/aoti/weights", m.path) != "weights.safetensors")
    throw Error("malformed manifest: " + at + "/files/aoti/weights is not weights.safetensors", m.path);
  return v;
}

}  // namespace

void read_fields(const json& doc, Manifest& m, const std::string& device, bool verify_files) {
  if (!doc.contains("format") || doc["format"] != "postdiff-artifact")
    throw Error("not a postdiff-compile artifact manifest (format is not \"postdiff-artifact\")", m.path);
  if (!doc.contains("format_version") || (doc["format_version"] != 1 && doc["format_version"] != 2))
    throw Error("format_version " + (doc.contains("format_version") ? doc["format_version"].dump() : "missing") +
                    ": this runner reads versions 1 and 2",
                m.path);
  const int version = doc["format_version"].get<int>();

  const auto formats = field<std::vector<std::string>>(doc, "/formats", m.path);
  if (std::find(formats.begin(), formats.end(), "aoti") == formats.end())
    throw Error("the artifact has no AOTInductor packages (formats: " + doc["formats"].dump() +
                    "); recompile with --format aoti",
                m.path);
  const std::string built = field<std::string>(doc, "/toolchain/torch", m.path);
  if (major_minor(built) != major_minor(TORCH_VERSION))
    throw Error("the AOTInductor packages were compiled with torch " + built + ", this runner links libtorch " +
                    TORCH_VERSION + "; build the runner against the torch that compiled the artifact",
                m.path);

  m.family = field<std::string>(doc, "/source/family", m.path);
  m.dtype = field<std::string>(doc, "/denoiser/dtype", m.path);
  m.steps = field<int>(doc, "/steps", m.path);
  m.height = field<int>(doc, "/resolution/height", m.path);
  m.width = field<int>(doc, "/resolution/width", m.path);
  m.latent_height = field<int>(doc, "/resolution/latent_height", m.path);
  m.latent_width = field<int>(doc, "/resolution/latent_width", m.path);
  const json config = field<json>(doc, "/config", m.path);
  if (!config.is_object()) throw Error("malformed manifest: /config is not an object", m.path);
  m.cross_attn_cache = config.contains("cross_attn_cache")
                           ? field<std::string>(doc, "/config/cross_attn_cache", m.path)
                           : "off";

  const auto plan = field<json>(doc, "/plan", m.path);
  for (size_t i = 0; i < plan.size(); ++i) {
    const std::string at = "/plan/" + std::to_string(i);
    PlanStep step;
    step.index = field<int>(doc, at + "/index", m.path);
    step.variant_id = field<std::string>(doc, at + "/variant_id", m.path);
    step.cfg = field<bool>(doc, at + "/cfg", m.path);
    const auto reads = field<std::vector<std::string>>(doc, at + "/reads", m.path);
    step.reads_cross_attn = std::find(reads.begin(), reads.end(), "cross_attn") != reads.end();
    step.writes = field<std::vector<std::string>>(doc, at + "/writes", m.path);
    step.low_res = field<std::string>(doc, at + "/resolution", m.path) == "low";
    if (step.index != static_cast<int>(i))
      throw Error("malformed manifest: plan step " + std::to_string(i) + " has index " + std::to_string(step.index),
                  m.path);
    m.plan.push_back(step);
  }
  if (static_cast<int>(m.plan.size()) != m.steps)
    throw Error("malformed manifest: the plan has " + std::to_string(m.plan.size()) + " steps, steps says " +
                    std::to_string(m.steps),
                m.path);

  if (!doc.contains("transition")) throw Error("malformed manifest: field /transition is missing", m.path);
  if (!doc["transition"].is_null()) {
    TransitionSpec t;
    t.switch_step = field<int>(doc, "/transition/switch_step", m.path);
    t.low = field<std::vector<int64_t>>(doc, "/transition/low_latent_size", m.path);
    t.full = field<std::vector<int64_t>>(doc, "/transition/full_latent_size", m.path);
    const std::string space = field<std::string>(doc, "/transition/latent_space", m.path);
    t.prediction_type = field<std::string>(doc, "/transition/prediction_type", m.path);
    t.renoise = field<std::string>(doc, "/transition/renoise", m.path);
    t.clamp_x0 = field<double>(doc, "/transition/clamp_x0", m.path);
    t.sigma_space = space == "sigma";
    t.flow = t.prediction_type == "flow";
    if (t.low.size() != 2 || t.full.size() != 2 || t.switch_step < 1 || t.switch_step >= m.steps ||
        t.low[0] < 1 || t.low[1] < 1 || t.full[0] < 1 || t.full[1] < 1)
      throw Error("malformed manifest: /transition sizes or switch_step out of range", m.path);
    if (space != "vp" && space != "sigma" && space != "flow")
      throw Error("malformed manifest: /transition/latent_space " + space + " (vp, sigma or flow)", m.path);
    if (t.prediction_type != "epsilon" && t.prediction_type != "v_prediction" && t.prediction_type != "sample" &&
        !t.flow)
      throw Error("malformed manifest: /transition/prediction_type " + t.prediction_type +
                      " (epsilon, v_prediction, sample or flow)",
                  m.path);
    if (t.flow != (space == "flow"))
      throw Error("malformed manifest: /transition/latent_space " + space + " with prediction_type " +
                      t.prediction_type + " (flow goes with flow only)",
                  m.path);
    if (t.renoise != "fresh" && t.renoise != "predicted")
      throw Error("malformed manifest: /transition/renoise " + t.renoise, m.path);
    if (!(t.clamp_x0 >= 0 && t.clamp_x0 < 1e300))
      throw Error("malformed manifest: /transition/clamp_x0 must be a finite number >= 0", m.path);
    if (t.flow) {   // x0 = x - sigma_t out and eps = x + (1 - sigma_t) out divide by nothing: sigma_t = 1 is fine
      t.sigma_t = field<double>(doc, "/transition/sigma_t", m.path);
      t.sigma_next = field<double>(doc, "/transition/sigma_next", m.path);
      if (!(t.sigma_t > 0 && t.sigma_t <= 1) || !(t.sigma_next >= 0 && t.sigma_next < t.sigma_t))
        throw Error("malformed manifest: /transition sigma_t must be in (0, 1], sigma_next in [0, sigma_t)", m.path);
    } else {
      t.alpha_bar_t = field<double>(doc, "/transition/alpha_bar_t", m.path);
      t.alpha_bar_next = field<double>(doc, "/transition/alpha_bar_next", m.path);
      if (!(t.alpha_bar_t > 0 && t.alpha_bar_t < 1) || !(t.alpha_bar_next > 0 && t.alpha_bar_next <= 1))
        throw Error("malformed manifest: /transition alpha_bar_t must be in (0, 1), alpha_bar_next in (0, 1]", m.path);
    }
    m.transition = t;
  }
  int low = 0;
  for (const auto& step : m.plan) low += step.low_res;
  for (const auto& step : m.plan)
    if (step.low_res != (step.index < low))
      throw Error("malformed manifest: low-resolution steps must come first", m.path);
  if (low != (m.transition ? m.transition->switch_step : 0))
    throw Error("malformed manifest: the plan and the transition disagree on the switch step", m.path);

  if (!doc.contains("scheduler_table"))
    throw Error("the manifest has no scheduler_table (built by postdiff-compile before the C++ runner existed); "
                "recompile the artifact",
                m.path);
  const json& table = doc["scheduler_table"];
  if (!table.is_object()) throw Error("malformed manifest: /scheduler_table is not an object", m.path);
  if (!table.contains("steps") || table["steps"].is_null())
    throw Error("the C++ runner cannot run this artifact's scheduler: " +
                    (table.contains("reason") && table["reason"].is_string() ? table["reason"].get<std::string>()
                                                                            : std::string("no table")),
                m.path);
  m.init_noise_sigma = field<double>(doc, "/scheduler_table/init_noise_sigma", m.path);
  // set_timesteps (flow matching): absent or {} for most; FLUX-dev's {"sigmas": [...], "mu": x}. The table rows
  // already hold the shifted timesteps, so only the shape of what is there is checked.
  if (doc.contains("set_timesteps")) {
    if (!doc["set_timesteps"].is_object())
      throw Error("malformed manifest: /set_timesteps is not an object", m.path);
    if (doc["set_timesteps"].contains("sigmas")) {
      m.sigmas = field<std::vector<double>>(doc, "/set_timesteps/sigmas", m.path);
      if (static_cast<int>(m.sigmas.size()) != m.steps)
        throw Error("malformed manifest: /set_timesteps/sigmas: " + std::to_string(m.sigmas.size()) +
                        " sigmas for " + std::to_string(m.steps) + " steps",
                    m.path);
      for (double sigma : m.sigmas)
        if (!(sigma >= 0 && sigma <= 1))
          throw Error("malformed manifest: /set_timesteps/sigmas holds " + std::to_string(sigma) +
                          ", outside [0, 1]",
                      m.path);
    }
    if (doc["set_timesteps"].contains("mu")) field<double>(doc, "/set_timesteps/mu", m.path);
  }
  const auto rows = field<json>(doc, "/scheduler_table/steps", m.path);
  for (size_t i = 0; i < rows.size(); ++i) {
    const std::string at = "/scheduler_table/steps/" + std::to_string(i);
    TableRow row;
    row.index = field<int>(doc, at + "/index", m.path);
    row.timestep = field<double>(doc, at + "/timestep", m.path);
    row.input_scale = field<double>(doc, at + "/input_scale", m.path);
    row.transition = field<bool>(doc, at + "/transition", m.path);
    row.noise_draws = field<int>(doc, at + "/noise_draws", m.path);
    row.update = field<std::vector<std::pair<int, double>>>(doc, at + "/update", m.path);
    if (rows.is_array() && rows[i].is_object() && rows[i].contains("clip")) {
      row.clip = true;
      row.clip_range = field<double>(doc, at + "/clip/range", m.path);
      row.clip_weight = field<double>(doc, at + "/clip/weight", m.path);
      row.clip_x0 = field<std::vector<std::pair<int, double>>>(doc, at + "/clip/x0", m.path);
    }
    m.table.push_back(row);
  }
  if (m.table.size() != m.plan.size())
    throw Error("malformed manifest: the scheduler table has " + std::to_string(m.table.size()) +
                    " steps, the plan " + std::to_string(m.plan.size()),
                m.path);
  check_table(m);
  const auto variants = field<json>(doc, "/variants", m.path);
  if (!variants.is_array() || variants.empty()) throw Error("malformed manifest: /variants is empty", m.path);
  for (size_t i = 0; i < variants.size(); ++i)
    m.variants.push_back(package_entry(doc, "/variants/" + std::to_string(i), m, device, version, verify_files));
  // ControlNets (absent without one): each graph an AOTInductor package like a variant's, by (net, batch, size).
  if (doc.contains("controlnets")) {
    const auto nets = field<json>(doc, "/controlnets", m.path);
    if (!nets.is_array() || nets.empty() || nets.size() > 8)
      throw Error("malformed manifest: /controlnets must list 1 to 8 ControlNets", m.path);
    m.controlnets = static_cast<int>(nets.size());
    for (size_t n = 0; n < nets.size(); ++n) {
      const std::string at = "/controlnets/" + std::to_string(n);
      if (field<int>(doc, at + "/index", m.path) != static_cast<int>(n))
        throw Error("malformed manifest: " + at + "/index is not " + std::to_string(n), m.path);
      const auto graphs = field<json>(doc, at + "/graphs", m.path);
      if (!graphs.is_array() || graphs.empty()) throw Error("malformed manifest: " + at + "/graphs is empty", m.path);
      for (size_t g = 0; g < graphs.size(); ++g) {
        const std::string where = at + "/graphs/" + std::to_string(g);
        ControlNetGraph graph;
        graph.net = static_cast<int>(n);
        graph.entry = package_entry(doc, where, m, device, version, verify_files);
        graph.batch = field<int64_t>(doc, where + "/batch", m.path);
        const auto size = field<std::vector<int64_t>>(doc, where + "/latent_size", m.path);
        if (size.size() != 2) throw Error("malformed manifest: " + where + "/latent_size is not [h, w]", m.path);
        graph.latent = {size[0], size[1]};
        bool conditioning = false;
        for (const auto& spec : graph.entry.inputs) conditioning = conditioning || spec.name == "controlnet_cond";
        if (!conditioning || graph.entry.inputs[0].shape[0] != graph.batch)
          throw Error("malformed manifest: " + where + " takes no controlnet_cond or another batch", m.path);
        m.controlnet_graphs.push_back(graph);
      }
    }
  }
  if (version >= 2) {
    const std::string file = field<std::string>(doc, "/weights/file", m.path);
    if (file != "weights.safetensors")
      throw Error("malformed manifest: /weights/file is not weights.safetensors", m.path);
    m.weights = (fs::path(m.folder) / file).string();
    if (fs::is_symlink(m.weights)) throw Error("the weights file is a symbolic link", m.weights);
    if (!fs::is_regular_file(m.weights)) throw Error("the weights file is missing", m.weights);
    if (fs::file_size(m.weights) != field<uint64_t>(doc, "/weights/bytes", m.path))
      throw Error("has " + std::to_string(fs::file_size(m.weights)) + " bytes, not the manifest's: damaged or replaced",
                  m.weights);
    if (verify_files && sha256_file(m.weights) != field<std::string>(doc, "/weights/sha256", m.path))
      throw Error("sha256 differs from the manifest's: damaged or replaced", m.weights);
  }
  for (const auto& step : m.plan) {
    bool found = false;
    for (const auto& v : m.variants) found = found || v.id == step.variant_id;
    if (!found) throw Error("malformed manifest: plan step " + std::to_string(step.index) + " names variant " +
                                step.variant_id + ", which is not in /variants",
                            m.path);
  }

}

}  // namespace postdiff
