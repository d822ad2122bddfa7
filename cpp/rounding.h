// The clamp and rounding constant every quantizer uses (cpp/quantize.cpp, cuda/quantize.cu,
// cuda/quantize_pack.cu), so CPU and GPU round the same way: (t + M) - M rounds t to the
// nearest integer, ties to even (default rounding mode), for |t| < 2^22 (float) / 2^51
// (double), and gives +0.0 where rint would keep -0.0. Callers must not let the compiler
// contract or reassociate the two additions.
#pragma once
#include "host_device.h"

namespace soniq {

template <class T>
SONIQ_HD T clampv(T v, T lo, T hi) { return v < lo ? lo : (v > hi ? hi : v); }

// 1.5 * 2^(mantissa bits)
template <class T>
SONIQ_HD constexpr T magic();
template <>
SONIQ_HD constexpr float magic<float>() { return 12582912.0f; }
template <>
SONIQ_HD constexpr double magic<double>() { return 6755399441055744.0; }

}  // namespace soniq
