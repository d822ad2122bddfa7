// Run-time choice of the kernel table. The ISA is chosen once from the CPU (best
// available) unless SONIQ_ISA or set_isa() forces one; forcing a path the CPU lacks
// throws instead of letting an illegal instruction kill the process.
#pragma once
#include <string>
#include <vector>

#include "kernels.h"

namespace soniq {

std::vector<std::string> supported_isas();   // on this CPU, in order scalar < avx2 < avx512 < amx
// Paths that run the AMX kernel's code on its emulation (cpp/amx_emu.h): tests, on CPUs with
// AVX-512; settable by set_isa, never in supported_isas() nor chosen by default.
std::vector<std::string> emulated_isas();
std::vector<std::string> compiled_isas();    // built into this binary
std::string missing_features(const std::string& isa);  // "" when the CPU has them all
const KernelTable& active_kernels();
const KernelTable* kernels_for(const std::string& isa);  // nullptr when not compiled in
std::string active_isa();
void set_isa(const std::string& isa);        // throws std::invalid_argument
#if defined(SONIQ_HAVE_X86_ISAS)
// True when table t's layout_gemm gives kernels_avx512()'s integer totals on random operands
// (the check AMX passes before it is offered; t must be runnable on this CPU).
bool layout_gemm_agrees_with_avx512(const KernelTable& t);
#endif

}  // namespace soniq
