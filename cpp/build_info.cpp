#include "build_info.h"

namespace soniq {

std::string compiler_version() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

std::string cuda_archs() {
#ifdef SONIQ_CUDA_ARCHS
  return SONIQ_CUDA_ARCHS;
#else
  return "";
#endif
}

}  // namespace soniq
