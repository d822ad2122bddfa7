// Each area of the native core registers its Python bindings from its own file
// (bindings/<area>.cpp) through one of these; module.cpp calls them all.
#pragma once
#include <pybind11/pybind11.h>

namespace soniq::bindings {

void register_core(pybind11::module_& m);  // module.cpp: info, dispatch, threads, pack, mpgemm
void register_cpu_kernels(pybind11::module_& m);  // cpu_kernels.cpp: kernel path choice
void register_quantize(pybind11::module_& m);  // quantize.cpp: quantizer, Philox noise
void register_actpack(pybind11::module_& m);  // actpack.cpp: fused activation quantize + pack
void register_linear(pybind11::module_& m);  // linear.cpp: the packed Linear layer's fused CPU forward
void register_cuda(pybind11::module_& m);  // cuda.cpp: CUDA kernel choice

}  // namespace soniq::bindings
