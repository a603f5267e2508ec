// Shared declarations of the batched in-place KV-cache fork (csrc/kv_fork.cpp, csrc/cuda/kv_fork.cu).
//
// kv_fork_(caches, src_rows, dst_rows, n_tokens): for every tensor c of `caches` and every pair j,
//     c[dst_rows[j], :n_tokens] = c[src_rows[j], :n_tokens]
// Each cache is [rows, tokens, ...] with the dims after the row dim contiguous, so one (tensor, pair) copy
// is a single contiguous byte span of n_tokens * token_bytes: the op is a byte copy and works for any dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace arcopo_fast {

// Every check names the argument and states the constraint; TORCH_CHECK_VALUE raises ValueError in Python,
// the same type (and the same text) as the pure-torch fallback in arcopo_fast/ext.py.
#define KV_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "kv_fork_: ", __VA_ARGS__)
#define CHECK_INDEX(x, name)                                                                      \
  do {                                                                                            \
    KV_CHECK((x).scalar_type() == at::kLong, name " must be an int64 tensor, got ", dtype_name(x)); \
    KV_CHECK((x).dim() == 1, name " must be 1-D, got shape ", (x).sizes());                         \
  } while (0)
#define CHECK_SAME_DEVICE(x, name, ref)                                                             \
  KV_CHECK((x).device() == (ref).device(), name " must be on the caches' device ", (ref).device(), \
           ", got ", (x).device())

// "torch.bfloat16", as Python prints it (the fallback formats its messages the same way).
std::string dtype_name(const at::Tensor& t);

// Geometry of one cache tensor, in bytes.
struct CacheSpan {
  char* base;          // caches[i].data_ptr(): [rows, tokens, ...]
  int64_t row_stride;  // bytes between consecutive rows (rows may be strided)
  int64_t span;        // bytes copied per pair: n_tokens * (bytes of one token)
  int64_t rows;        // caches[i].size(0)
};

// Metadata checks (shapes, dtypes, devices, strides, n_tokens): never read tensor data, so never sync.
// Returns the per-tensor geometry.
std::vector<CacheSpan> check_metadata(at::TensorList caches, const at::Tensor& src_rows,
                                      const at::Tensor& dst_rows, int64_t n_tokens);

// Value checks on CPU index tensors: every row in range of every cache, dst rows distinct, no dst row is a
// source row. O(pairs) with a hash map.
void check_row_values(at::TensorList caches, const at::Tensor& src_rows_cpu, const at::Tensor& dst_rows_cpu);

// ARCOPO_KV_FORK_CHECK=1: also run check_row_values on CUDA index tensors (copies them to the host: a
// sync, so not for hot paths or CUDA-graph capture).
bool debug_checks_enabled();

}  // namespace arcopo_fast
