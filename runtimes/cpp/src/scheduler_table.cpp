#include "scheduler_table.h"

#include "postdiff/runner.h"

namespace postdiff {

torch::Tensor SchedulerState::step(const TableRow& row, const torch::Tensor& latents,
                                   const torch::Tensor& model_output, at::Generator& generator, torch::Dtype dtype) {
  basis_.push_back(latents.to(torch::kFloat32));
  basis_.push_back(model_output.to(torch::kFloat32));
  for (int i = 0; i < row.noise_draws; ++i)
    basis_.push_back(
        torch::randn(latents.sizes(), generator, torch::TensorOptions().dtype(dtype)).to(latents.device(), torch::kFloat32));
  torch::Tensor next = combine(row, row.update);
  if (row.clip) {
    torch::Tensor x0 = combine(row, row.clip_x0);
    next = next + row.clip_weight * (x0.clamp(-row.clip_range, row.clip_range) - x0);
  }
  return next;
}

torch::Tensor SchedulerState::combine(const TableRow& row, const std::vector<std::pair<int, double>>& terms) const {
  torch::Tensor sum;
  for (const auto& [index, coefficient] : terms) {
    if (index < 0 || index >= static_cast<int>(basis_.size()))
      throw Error("malformed manifest: scheduler table step " + std::to_string(row.index) + " reads tensor " +
                  std::to_string(index) + " of " + std::to_string(basis_.size()));
    torch::Tensor term = basis_[index] * coefficient;
    sum = sum.defined() ? sum + term : term;
  }
  return sum.defined() ? sum : torch::zeros_like(basis_[0]);
}

}  // namespace postdiff
