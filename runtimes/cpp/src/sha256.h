// SHA-256 (FIPS 180-4) of bytes and of files, as lowercase hex: the manifest's checksums.
#pragma once

#include <string>

namespace postdiff {

std::string sha256_hex(const std::string& bytes);
std::string sha256_file(const std::string& path);   // throws postdiff::Error if the file cannot be read

}  // namespace postdiff
