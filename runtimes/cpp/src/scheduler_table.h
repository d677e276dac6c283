// The scheduler without diffusers: each step's update as a linear combination of the tensors of the current
// segment (exporters/scheduler_table.py writes the table and says why that is exact).
#pragma once

#include <torch/types.h>

#include <vector>

#include "manifest.h"

namespace postdiff {

class SchedulerState {
 public:
  // After step `row` produced the guided `model_output` from `latents`: the next latents (float32).
  // Draws the step's noise from `generator` in the artifact's dtype, as diffusers' randn_tensor does.
  torch::Tensor step(const TableRow& row, const torch::Tensor& latents, const torch::Tensor& model_output,
                     at::Generator& generator, torch::Dtype dtype);
  void restart() { basis_.clear(); }   // a new segment: after the resolution transition

 private:
  torch::Tensor combine(const TableRow& row, const std::vector<std::pair<int, double>>& terms) const;
  std::vector<torch::Tensor> basis_;
};

}  // namespace postdiff
