// safetensors: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
// then the raw little-endian data. Enough of it for embeddings in and latents out.
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "postdiff/runner.h"

namespace postdiff {
namespace {

const std::map<std::string, torch::Dtype>& dtypes() {
  static const std::map<std::string, torch::Dtype> table = {
      {"F32", torch::kFloat32}, {"F16", torch::kFloat16}, {"BF16", torch::kBFloat16}, {"F64", torch::kFloat64},
      {"I64", torch::kInt64},   {"I32", torch::kInt32},   {"I16", torch::kInt16},     {"I8", torch::kInt8},
      {"U8", torch::kUInt8},    {"BOOL", torch::kBool}};
  return table;
}

std::string dtype_name(torch::Dtype dtype) {
  for (const auto& [name, value] : dtypes())
    if (value == dtype) return name;
  throw Error(std::string("cannot write dtype ") + std::string(c10::toString(dtype)) + " to safetensors");
}

}  // namespace

TensorMap read_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot be read (no such file?)", path);
  in.seekg(0, std::ios::end);
  const uint64_t size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  unsigned char prefix[8];
  if (size < 8 || !in.read(reinterpret_cast<char*>(prefix), 8)) throw Error("not a safetensors file: too short", path);
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | prefix[i];
  if (header_size > size - 8) throw Error("not a safetensors file: header length past the end of the file", path);
  std::string header(header_size, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_size));
  if (static_cast<uint64_t>(in.gcount()) != header_size) throw Error("not a safetensors file: header cut short", path);
  nlohmann::json entries;
  try {
    entries = nlohmann::json::parse(header);
  } catch (const nlohmann::json::exception& err) {
    throw Error(std::string("not a safetensors file: header is not JSON (") + err.what() + ")", path);
  }
  if (!entries.is_object()) throw Error("not a safetensors file: header is not a JSON object", path);
  const uint64_t data_start = 8 + header_size;
  TensorMap tensors;
  for (const auto& [name, entry] : entries.items()) {
    if (name == "__metadata__") continue;
    try {
      const std::string dtype = entry.at("dtype").get<std::string>();
      auto found = dtypes().find(dtype);
      if (found == dtypes().end()) throw Error("tensor " + name + " has unsupported dtype " + dtype, path);
      std::vector<int64_t> shape = entry.at("shape").get<std::vector<int64_t>>();
      auto offsets = entry.at("data_offsets").get<std::vector<uint64_t>>();
      // Sizes are checked against the file before anything is allocated: the header is untrusted.
      uint64_t bytes = c10::elementSize(found->second);
      for (int64_t dim : shape) {
        if (dim < 0) throw Error("tensor " + name + " has a negative dimension", path);
        if (dim != 0 && bytes > (size - data_start) / static_cast<uint64_t>(dim))
          throw Error("tensor " + name + ": its shape needs more bytes than the file has", path);
        bytes *= static_cast<uint64_t>(dim);
      }
      if (offsets.size() != 2 || offsets[1] < offsets[0] || offsets[1] > size - data_start ||
          offsets[1] - offsets[0] != bytes)
        throw Error("tensor " + name + ": data_offsets do not match its shape and dtype or the file size", path);
      torch::Tensor tensor = torch::empty(shape, torch::TensorOptions().dtype(found->second));
      in.seekg(static_cast<std::streamoff>(data_start + offsets[0]));
      in.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(bytes));
      if (static_cast<uint64_t>(in.gcount()) != bytes) throw Error("tensor " + name + ": file ends early", path);
      tensors[name] = tensor;
    } catch (const nlohmann::json::exception& err) {
      throw Error("tensor " + name + ": malformed header entry (" + err.what() + ")", path);
    }
  }
  return tensors;
}

void write_safetensors(const std::string& path, const TensorMap& tensors) {
  nlohmann::json header = nlohmann::json::object();
  std::vector<torch::Tensor> data;
  uint64_t offset = 0;
  for (const auto& [name, value] : tensors) {
    torch::Tensor tensor = value.to(torch::kCPU).contiguous();
    const uint64_t bytes = tensor.numel() * tensor.element_size();
    header[name] = {{"dtype", dtype_name(tensor.scalar_type())},
                    {"shape", tensor.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(tensor);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');   // the data starts 8-byte aligned
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error("cannot be written", tmp);
    uint64_t n = text.size();
    for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const auto& tensor : data)
      out.write(static_cast<const char*>(tensor.data_ptr()),
                static_cast<std::streamsize>(tensor.numel() * tensor.element_size()));
    if (!out.flush()) throw Error("write failed", tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error("cannot move the finished file into place", path);
  }
}

}  // namespace postdiff
