#include "manifest.h"

#include <torch/version.h>

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

Manifest read_manifest(const std::string& folder, const std::string& device, bool verify_files) {
  Manifest m;
  m.folder = folder;
  m.path = (fs::path(folder) / "manifest.json").string();
  if (!fs::is_directory(folder)) throw Error("no such artifact folder", folder);
  const std::string text = read_text(m.path, "the manifest");
  const std::string checksum_path = (fs::path(folder) / "manifest.sha256").string();
  const std::string checksum = read_text(checksum_path, "the manifest checksum");
  if (checksum.substr(0, checksum.find_first_of(" \t\n")) != sha256_hex(text))
    throw Error("does not match manifest.sha256: the manifest was edited or damaged", m.path);

  json doc;
  try {
    doc = json::parse(text);
  } catch (const json::exception& err) {
    throw Error(std::string("malformed manifest: not JSON (") + err.what() + ")", m.path);
  }
  if (!doc.is_object()) throw Error("malformed manifest: not a JSON object", m.path);
  if (doc.value("format", "") != "postdiff-artifact")
    throw Error("not a postdiff-compile artifact manifest (format is not \"postdiff-artifact\")", m.path);
  if (!doc.contains("format_version") || doc["format_version"] != 1)
    throw Error("format_version " + (doc.contains("format_version") ? doc["format_version"].dump() : "missing") +
                    ": this runner reads version 1 only",
                m.path);

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
  m.cross_attn_cache = config.value("cross_attn_cache", "off");

  const auto plan = field<json>(doc, "/plan", m.path);
  for (size_t i = 0; i < plan.size(); ++i) {
    const std::string at = "/plan/" + std::to_string(i);
    PlanStep step;
    step.index = field<int>(doc, at + "/index", m.path);
    step.variant_id = field<std::string>(doc, at + "/variant_id", m.path);
    step.cfg = field<bool>(doc, at + "/cfg", m.path);
    const auto reads = field<std::vector<std::string>>(doc, at + "/reads", m.path);
    step.reads_cross_attn = std::find(reads.begin(), reads.end(), "cross_attn") != reads.end();
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
    t.alpha_bar_t = field<double>(doc, "/transition/alpha_bar_t", m.path);
    t.alpha_bar_next = field<double>(doc, "/transition/alpha_bar_next", m.path);
    t.sigma_space = field<std::string>(doc, "/transition/latent_space", m.path) == "sigma";
    t.prediction_type = field<std::string>(doc, "/transition/prediction_type", m.path);
    t.renoise = field<std::string>(doc, "/transition/renoise", m.path);
    t.clamp_x0 = field<double>(doc, "/transition/clamp_x0", m.path);
    if (t.low.size() != 2 || t.full.size() != 2 || t.switch_step < 1 || t.switch_step >= m.steps)
      throw Error("malformed manifest: /transition sizes or switch_step out of range", m.path);
    m.transition = t;
  }

  const auto variants = field<json>(doc, "/variants", m.path);
  if (!variants.is_array() || variants.empty()) throw Error("malformed manifest: /variants is empty", m.path);
  for (size_t i = 0; i < variants.size(); ++i) {
    const std::string at = "/variants/" + std::to_string(i);
    VariantEntry v;
    v.id = field<std::string>(doc, at + "/id", m.path);
    v.inputs = tensor_specs(doc, at + "/inputs", m.path);
    v.outputs = tensor_specs(doc, at + "/outputs", m.path);
    const std::string file = field<std::string>(doc, at + "/files/aoti/file", m.path);
    if (file.find('/') != std::string::npos || file == "..")
      throw Error("malformed manifest: file name " + file + " is not a plain name", m.path);
    const std::string built_for = field<std::string>(doc, at + "/files/aoti/device", m.path);
    if (built_for != device)
      throw Error("compiled for " + built_for + ", asked to run on " + device, (fs::path(folder) / file).string());
    v.package = (fs::path(folder) / file).string();
    if (!fs::is_regular_file(v.package)) throw Error("the AOTInductor package is missing", v.package);
    const auto bytes = field<uint64_t>(doc, at + "/files/aoti/bytes", m.path);
    if (fs::file_size(v.package) != bytes)
      throw Error("has " + std::to_string(fs::file_size(v.package)) + " bytes, the manifest says " +
                      std::to_string(bytes) + ": damaged or replaced",
                  v.package);
    if (verify_files && sha256_file(v.package) != field<std::string>(doc, at + "/files/aoti/sha256", m.path))
      throw Error("sha256 differs from the manifest's: damaged or replaced", v.package);
    m.variants.push_back(v);
  }
  for (const auto& step : m.plan) {
    bool found = false;
    for (const auto& v : m.variants) found = found || v.id == step.variant_id;
    if (!found) throw Error("malformed manifest: plan step " + std::to_string(step.index) + " names variant " +
                                step.variant_id + ", which is not in /variants",
                            m.path);
  }

  if (!doc.contains("scheduler_table"))
    throw Error("the manifest has no scheduler_table (built by postdiff-compile before the C++ runner existed); "
                "recompile the artifact",
                m.path);
  const json& table = doc["scheduler_table"];
  if (table.value("steps", json()).is_null())
    throw Error("the C++ runner cannot run this artifact's scheduler: " + table.value("reason", std::string("?")),
                m.path);
  m.init_noise_sigma = field<double>(doc, "/scheduler_table/init_noise_sigma", m.path);
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
    if (rows[i].contains("clip")) {
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
  return m;
}

}  // namespace postdiff
