// SONIQ_HD marks small functions shared by the C++ core and the CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define SONIQ_HD __host__ __device__ __forceinline__
#else
#define SONIQ_HD inline
#endif
