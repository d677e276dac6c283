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
  torch::Tensor next;
  for (const auto& [index, coefficient] : row.update) {
    if (index < 0 || index >= static_cast<int>(basis_.size()))
      throw Error("malformed manifest: scheduler table step " + std::to_string(row.index) + " reads tensor " +
                  std::to_string(index) + " of " + std::to_string(basis_.size()));
    torch::Tensor term = basis_[index] * coefficient;
    next = next.defined() ? next + term : term;
  }
  if (!next.defined()) next = torch::zeros_like(basis_[0]);
  return next;
}

}  // namespace postdiff
