// CUDA build information; the op kernels for CUDA land with the CUDA issue, until then CUDA tensors are refused
// by the dispatcher ("Could not run 'torch_moe::...' with arguments from the 'CUDA' backend").
#include <cuda_runtime_api.h>

namespace torch_moe {
int cuda_runtime_version() { return CUDART_VERSION; }
}  // namespace torch_moe
