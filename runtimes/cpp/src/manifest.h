// manifest.json (format versions 1 and 2, docs/manifest.md) read and checked: what the C++ runner needs of it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace postdiff {

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype;
};

struct VariantEntry {
  std::string id;
  std::vector<TensorSpec> inputs, outputs;
  std::string package;   // path of the AOTInductor package
};

struct PlanStep {
  int index = 0;
  std::string variant_id;
  bool cfg = false;
  bool reads_cross_attn = false;
  std::vector<std::string> writes;   // the caches ("deepcache", "cross_attn") the step keeps of its variant's outputs
  bool low_res = false;
};

struct TableRow {   // one step of the scheduler table (exporters/scheduler_table.py)
  int index = 0;
  double timestep = 0, input_scale = 1;
  bool transition = false;
  int noise_draws = 0;
  std::vector<std::pair<int, double>> update;   // (basis index, coefficient)
  // clip_sample: update += clip_weight * (clamp(x0, -clip_range, clip_range) - x0), x0 = sum over clip_x0
  bool clip = false;
  double clip_range = 0, clip_weight = 0;
  std::vector<std::pair<int, double>> clip_x0;
};

struct TransitionSpec {
  int switch_step = 0;
  std::vector<int64_t> low, full;   // latent sizes [h, w]
  // The noise levels at steps switch_step - 1 and switch_step: alpha bars on the diffusion path; on the flow path
  // (prediction_type "flow", latent_space "flow": SD3, FLUX) the flow sigmas of x = (1 - sigma) x0 + sigma noise.
  double alpha_bar_t = 0, alpha_bar_next = 0;
  double sigma_t = 0, sigma_next = 0;
  bool sigma_space = false, flow = false;
  std::string prediction_type, renoise;
  double clamp_x0 = 0;
};

struct ControlNetGraph {   // one ControlNet's package for one batch and latent size
  int net = 0;
  int64_t batch = 1;
  std::pair<int64_t, int64_t> latent;
  VariantEntry entry;
};

struct Manifest {
  std::string folder, path;   // the artifact folder and its manifest.json
  std::string family, dtype, cross_attn_cache;
  int steps = 0, height = 0, width = 0, latent_height = 0, latent_width = 0;
  std::vector<PlanStep> plan;
  std::optional<TransitionSpec> transition;
  std::vector<VariantEntry> variants;
  int controlnets = 0;                          // ControlNets whose residuals the variants take (0: none)
  std::vector<ControlNetGraph> controlnet_graphs;
  std::string weights;   // format 2: the weights file every package loads its constants from; empty for format 1
  double init_noise_sigma = 1;
  std::vector<TableRow> table;
  // set_timesteps' sigmas (FLUX-dev; empty otherwise): checked against the step count only, since the table rows
  // already hold each step's timestep.
  std::vector<double> sigmas;
};

// Checks, in order, each failure one postdiff::Error naming the file: manifest.sha256 matches manifest.json;
// the JSON parses; format and format_version; AOTInductor packages compiled by this libtorch's major.minor
// version; the fields this runner reads, with their types and ranges, and their consistency (plan, transition
// and scheduler table agree; the table reads only tensors that exist); a scheduler table at all; then each
// package: compiled for `device`, present, its size and sha256.
Manifest read_manifest(const std::string& folder, const std::string& device, bool verify_files = true);

}  // namespace postdiff
