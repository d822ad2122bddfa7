// Run-time choice of the kernel table. The ISA is chosen once from the CPU (best
// available) unless SONIQ_ISA or set_isa() forces one; forcing a path the CPU lacks
// throws instead of letting an illegal instruction kill the process.
#pragma once
#include <string>
#include <vector>

#include "kernels.h"

namespace soniq {

std::vector<std::string> supported_isas();   // on this CPU, in order scalar < avx2 < avx512
std::vector<std::string> compiled_isas();    // built into this binary
std::string missing_features(const std::string& isa);  // "" when the CPU has them all
const KernelTable& active_kernels();
const KernelTable* kernels_for(const std::string& isa);  // nullptr when not compiled in
std::string active_isa();
void set_isa(const std::string& isa);        // throws std::invalid_argument

}  // namespace soniq
