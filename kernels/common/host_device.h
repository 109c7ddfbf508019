// Qualifiers for math shared between CUDA kernels and host C++ (host tests compile it with a
// plain C++ compiler, where the CUDA keywords do not exist).
#pragma once

#ifdef __CUDACC__
#define MVRFT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MVRFT_HOST_DEVICE inline
#endif

namespace mvrft {

template <typename T>
MVRFT_HOST_DEVICE T max_of(T a, T b) { return a > b ? a : b; }

template <typename T>
MVRFT_HOST_DEVICE T min_of(T a, T b) { return a < b ? a : b; }

}  // namespace mvrft
