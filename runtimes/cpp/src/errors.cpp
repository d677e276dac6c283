#include "postdiff/runner.h"

namespace postdiff {

Error::Error(const std::string& message, const std::string& file)
    : std::runtime_error(file.empty() ? message : file + ": " + message), file(file) {}

}  // namespace postdiff
