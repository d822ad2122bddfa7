// What this binary was built with, for soniq.info().
#pragma once
#include <string>

namespace soniq {

std::string compiler_version();
std::string cuda_archs();  // "" when built without CUDA

}  // namespace soniq
