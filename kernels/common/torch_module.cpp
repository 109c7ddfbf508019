// Python module init of the optional torch extension megatron_vrft_cuda. The ops themselves are
// registered by each kernels/*.cu (TORCH_LIBRARY_FRAGMENT(megatron_vrft, m)) when the library
// loads; importing this module is what loads it (see megatron_vrft/ops/cuda_ext.py).
#ifdef MEGATRON_VRFT_TORCH_EXTENSION
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_vrft CUDA kernels; ops live under torch.ops.megatron_vrft";
}
#endif
