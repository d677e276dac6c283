// postdiff-run: execute a postdiff-compile artifact (AOTInductor packages) from the command line.
//
//   postdiff-run ARTIFACT --embeddings IN.safetensors --out LATENTS.safetensors [--seed N]
//                [--guidance-scale G] [--device cpu|cuda] [--step-times] [--repeat N]
//                [--controlnet-scale S[,S...]] [--control-guidance-start A[,A...]] [--control-guidance-end B[,B...]]
//
// Exit status: 0 done; 2 bad input (artifact, embeddings, arguments), with one line naming the problem and
// the file; 1 anything else (a failure inside torch).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "postdiff/runner.h"

namespace {

const char* kUsage =
    "usage: postdiff-run ARTIFACT --embeddings IN.safetensors --out LATENTS.safetensors [--seed N]\n"
    "                    [--guidance-scale G] [--device cpu|cuda] [--step-times] [--repeat N]\n"
    "                    [--controlnet-scale S[,S...]] [--control-guidance-start A[,A...]]\n"
    "                    [--control-guidance-end B[,B...]]\n"
    "IN holds prompt_embeds [1, L, D], negative_prompt_embeds (artifacts with classifier-free guidance) and\n"
    "any added conditioning the artifact takes (SDXL text_embeds, SD3/FLUX pooled_projections, ...; negative_<name>\n"
    "for the negative half); LATENTS gets `latents` [1, C, H, W]. --guidance-scale defaults to the family's\n"
    "(7.5; LCM 8.5, SD3 7.0, FLUX 3.5). --step-times prints each step's time (and its package call's) to\n"
    "stderr; --repeat N generates N times (for timing; same result). An artifact compiled with ControlNets\n"
    "takes control_image (control_image_1, ... for more) [1, 3, H, W] in [0, 1] in IN, and the ControlNet\n"
    "pipeline's scale and guidance window: one value for every ControlNet or one per ControlNet.\n";

struct Args {
  std::string artifact, embeddings, out, device = "cpu";
  uint64_t seed = 0;
  std::optional<double> guidance_scale;
  bool step_times = false;
  int repeat = 1;
  std::vector<double> controlnet_scales, control_guidance_start, control_guidance_end;
};

// "0.7,0.4" -> {0.7, 0.4}; each item a whole number.
std::vector<double> numbers(const std::string& text) {
  std::vector<double> values;
  size_t begin = 0;
  while (true) {
    const size_t comma = text.find(',', begin);
    const std::string item = text.substr(begin, comma == std::string::npos ? std::string::npos : comma - begin);
    size_t used = 0;
    const double value = std::stod(item, &used);
    if (used != item.size()) throw std::invalid_argument(item);
    values.push_back(value);
    if (comma == std::string::npos) return values;
    begin = comma + 1;
  }
}

Args parse(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](const char* name) -> std::string {
      if (i + 1 >= argc) throw postdiff::Error(std::string(name) + " needs a value");
      return argv[++i];
    };
    // Whole-string numbers only: "3x" or "-1" for a seed is a mistake, not 3 or 2^64 - 1.
    auto whole = [&](const std::string& text, auto parse) {
      size_t used = 0;
      auto number = parse(text, &used);
      if (used != text.size() || text.empty() || (text[0] == '-' && arg == "--seed")) throw std::invalid_argument(text);
      return number;
    };
    try {
      if (arg == "--embeddings") args.embeddings = value("--embeddings");
      else if (arg == "--out") args.out = value("--out");
      else if (arg == "--seed")
        args.seed = whole(value("--seed"), [](const std::string& t, size_t* n) { return std::stoull(t, n); });
      else if (arg == "--guidance-scale")
        args.guidance_scale = whole(value("--guidance-scale"), [](const std::string& t, size_t* n) { return std::stod(t, n); });
      else if (arg == "--device") args.device = value("--device");
      else if (arg == "--controlnet-scale") args.controlnet_scales = numbers(value("--controlnet-scale"));
      else if (arg == "--control-guidance-start") args.control_guidance_start = numbers(value("--control-guidance-start"));
      else if (arg == "--control-guidance-end") args.control_guidance_end = numbers(value("--control-guidance-end"));
      else if (arg == "--step-times") args.step_times = true;
      else if (arg == "--repeat")
        args.repeat = whole(value("--repeat"), [](const std::string& t, size_t* n) { return std::stoi(t, n); });
      else if (arg == "-h" || arg == "--help") {
        std::fputs(kUsage, stdout);
        std::exit(0);
      } else if (!arg.empty() && arg[0] == '-') throw postdiff::Error("unknown option " + arg);
      else if (args.artifact.empty()) args.artifact = arg;
      else throw postdiff::Error("unexpected argument " + arg);
    } catch (const std::logic_error& err) {   // stoull / stod
      if (dynamic_cast<const postdiff::Error*>(&err)) throw;
      throw postdiff::Error("bad number for " + arg);
    }
  }
  if (args.artifact.empty() || args.embeddings.empty() || args.out.empty())
    throw postdiff::Error("ARTIFACT, --embeddings and --out are required");
  if (args.repeat < 1) throw postdiff::Error("--repeat must be at least 1");
  return args;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args args = parse(argc, argv);
    std::fprintf(stderr, "validating and opening %s ...\n", args.artifact.c_str());
    postdiff::Artifact artifact = postdiff::Artifact::open(args.artifact, args.device);
    const postdiff::TensorMap inputs = postdiff::read_safetensors(args.embeddings);
    postdiff::RunOptions options;
    options.seed = args.seed;
    options.guidance_scale = args.guidance_scale;
    options.print_step_times = args.step_times;
    options.controlnet_scales = args.controlnet_scales;
    options.control_guidance_start = args.control_guidance_start;
    options.control_guidance_end = args.control_guidance_end;
    torch::Tensor latents;
    try {
      for (int i = 0; i < args.repeat; ++i) {
        const auto began = std::chrono::steady_clock::now();
        latents = artifact.run(inputs, options);
        if (args.step_times)
          std::fprintf(stderr, "generation %d %.3f ms\n", i,
                       std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - began).count());
      }
    } catch (const postdiff::Error& err) {
      if (!err.file.empty()) throw;
      throw postdiff::Error(err.what(), args.embeddings);   // an input problem: name the inputs file
    }
    postdiff::write_safetensors(args.out, {{"latents", latents}});
    std::fprintf(stderr, "%s: latents %s after %d steps\n", args.out.c_str(),
                 c10::str(latents.sizes()).c_str(), artifact.steps());
    return 0;
  } catch (const postdiff::Error& err) {
    std::fprintf(stderr, "postdiff-run: error: %s\n%s", err.what(), err.file.empty() ? kUsage : "");
    return 2;
  } catch (const std::exception& err) {
    std::fprintf(stderr, "postdiff-run: internal error: %s\n", err.what());
    return 1;
  }
}
