// Batched in-place KV-cache fork: the schema, the argument checks, the CPU implementation and the module
// init of arcopo_fast._C. The CUDA implementation is csrc/cuda/kv_fork.cu (compiled only when torch has
// CUDA and nvcc is found, see CMakeLists.txt). Python API and fake kernel: arcopo_fast/ext.py.
#include <Python.h>  // first, as Python asks; only for PyInit__C (no pybind, no libtorch_python)

#include "kv_fork.h"

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unordered_map>

namespace arcopo_fast {

std::string dtype_name(const at::Tensor& t) {
  return "torch." + std::string(c10::getDtypeNames(t.scalar_type()).first);
}

bool debug_checks_enabled() {
  const char* v = std::getenv("ARCOPO_KV_FORK_CHECK");
  return v != nullptr && std::string(v) == "1";
}

std::vector<CacheSpan> check_metadata(at::TensorList caches, const at::Tensor& src_rows,
                                      const at::Tensor& dst_rows, int64_t n_tokens) {
  CHECK_INDEX(src_rows, "src_rows");
  CHECK_INDEX(dst_rows, "dst_rows");
  KV_CHECK(src_rows.size(0) == dst_rows.size(0), "src_rows and dst_rows must have the same length, got ",
           src_rows.size(0), " and ", dst_rows.size(0));
  KV_CHECK(n_tokens >= 0, "n_tokens must be >= 0, got ", n_tokens);
  std::vector<CacheSpan> spans;
  spans.reserve(caches.size());
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& c = caches[i];
    KV_CHECK(c.dim() >= 2, "caches[", i, "] must be [rows, tokens, ...] (at least 2-D), got shape ", c.sizes());
    KV_CHECK(c.device() == caches[0].device(), "caches[", i, "] must be on caches[0]'s device ",
             caches[0].device(), ", got ", c.device());
    KV_CHECK(c.scalar_type() == caches[0].scalar_type(), "caches[", i, "] must have caches[0]'s dtype ",
             dtype_name(caches[0]), ", got ", dtype_name(c));
    // Dims after the row dim must be contiguous (size-1 dims may have any stride): then c[r, :n] is one
    // contiguous span. Rows themselves may be strided.
    int64_t expected = 1;
    for (int64_t d = c.dim() - 1; d >= 1; --d) {
      KV_CHECK(c.size(d) == 1 || c.stride(d) == expected, "caches[", i,
               "] must be contiguous after the row dim, got shape ", c.sizes(), " and strides ", c.strides());
      expected *= c.size(d);
    }
    const int64_t row_numel = expected;  // elements of one row: tokens * token size
    KV_CHECK(c.size(0) <= 1 || row_numel == 0 || c.stride(0) >= row_numel, "caches[", i,
             "] has overlapping rows: stride(0) = ", c.stride(0), " is less than the ", row_numel,
             " elements of a row (shape ", c.sizes(), ")");
    KV_CHECK(n_tokens <= c.size(1), "n_tokens (", n_tokens, ") must be <= the tokens of caches[", i,
             "] (shape ", c.sizes(), ")");
    const int64_t token_bytes = (c.size(1) == 0 ? 0 : row_numel / c.size(1)) * c.element_size();
    spans.push_back({static_cast<char*>(c.data_ptr()), c.stride(0) * c.element_size(), n_tokens * token_bytes,
                     c.size(0)});
  }
  if (!caches.empty()) {
    CHECK_SAME_DEVICE(src_rows, "src_rows", caches[0]);
    CHECK_SAME_DEVICE(dst_rows, "dst_rows", caches[0]);
  }
  return spans;
}

void check_row_values(at::TensorList caches, const at::Tensor& src_rows_cpu, const at::Tensor& dst_rows_cpu) {
  TORCH_INTERNAL_ASSERT(src_rows_cpu.is_cpu() && dst_rows_cpu.is_cpu());
  const at::Tensor s_t = src_rows_cpu.contiguous(), d_t = dst_rows_cpu.contiguous();
  const int64_t* s = s_t.data_ptr<int64_t>();
  const int64_t* d = d_t.data_ptr<int64_t>();
  const int64_t P = s_t.size(0);
  if (!caches.empty()) {
    // The tightest bound: the first cache with the fewest rows.
    size_t imin = 0;
    for (size_t i = 1; i < caches.size(); ++i) {
      if (caches[i].size(0) < caches[imin].size(0)) imin = i;
    }
    const int64_t R = caches[imin].size(0);
    for (int64_t j = 0; j < P; ++j) {
      KV_CHECK(0 <= s[j] && s[j] < R, "src_rows[", j, "] = ", s[j], " is out of range for caches[", imin,
               "] with ", R, " rows");
      KV_CHECK(0 <= d[j] && d[j] < R, "dst_rows[", j, "] = ", d[j], " is out of range for caches[", imin,
               "] with ", R, " rows");
    }
  }
  std::unordered_map<int64_t, int64_t> first_src, first_dst;  // row -> first pair that names it
  for (int64_t j = 0; j < P; ++j) first_src.emplace(s[j], j);
  for (int64_t j = 0; j < P; ++j) {
    const auto dup = first_dst.emplace(d[j], j);
    KV_CHECK(dup.second, "dst_rows must be distinct, got dst_rows[", dup.first->second, "] = dst_rows[", j,
             "] = ", d[j]);
    const auto it = first_src.find(d[j]);
    KV_CHECK(it == first_src.end(), "dst_rows[", j, "] = ", d[j], " is also a source row (src_rows[",
             it->second, "]): a destination must never be a source");
  }
}

namespace {

void kv_fork_cpu(at::TensorList caches, const at::Tensor& src_rows, const at::Tensor& dst_rows,
                 int64_t n_tokens) {
  const std::vector<CacheSpan> spans = check_metadata(caches, src_rows, dst_rows, n_tokens);
  check_row_values(caches, src_rows, dst_rows);  // CPU indices: full checks, no device to sync with
  const int64_t T = static_cast<int64_t>(spans.size()), P = src_rows.size(0);
  int64_t max_span = 0;
  for (const auto& sp : spans) max_span = std::max(max_span, sp.span);
  if (T == 0 || P == 0 || max_span == 0) return;

  const at::Tensor s_t = src_rows.contiguous(), d_t = dst_rows.contiguous();
  const int64_t* s = s_t.data_ptr<int64_t>();
  const int64_t* d = d_t.data_ptr<int64_t>();
  // Work item = (tensor, pair, 1 MiB piece) so that a few long copies still spread over all threads; a task
  // gets at least ~1 MiB so that tiny forks stay on the calling thread.
  constexpr int64_t kPiece = int64_t{1} << 20;
  const int64_t pieces = (max_span + kPiece - 1) / kPiece;
  const int64_t grain = std::max<int64_t>(1, kPiece / std::min(max_span, kPiece));
  at::parallel_for(0, T * P * pieces, grain, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t t = w / (P * pieces), j = (w / pieces) % P, off = (w % pieces) * kPiece;
      const CacheSpan& sp = spans[t];
      if (off >= sp.span) continue;
      // Rows are distinct and never both read and written (checked above): the spans never overlap.
      std::memcpy(sp.base + d[j] * sp.row_stride + off, sp.base + s[j] * sp.row_stride + off,
                  std::min(kPiece, sp.span - off));
    }
  });
}

}  // namespace

// One library per project; one comment per op.
TORCH_LIBRARY(arcopo_fast, m) {
  // Fake (meta) kernel lives in Python: torch imports this module when it needs it.
  m.set_python_module("arcopo_fast.ext");
  // In place, for every c in caches and every j: c[dst_rows[j], :n_tokens] = c[src_rows[j], :n_tokens].
  m.def("kv_fork_(Tensor(a!)[] caches, Tensor src_rows, Tensor dst_rows, int n_tokens) -> ()");
}

TORCH_LIBRARY_IMPL(arcopo_fast, CPU, m) { m.impl("kv_fork_", &kv_fork_cpu); }

}  // namespace arcopo_fast

#ifndef ARCOPO_CUDA_ARCHS
#define ARCOPO_CUDA_ARCHS ""
#endif

// Importing arcopo_fast._C runs the static registrations above. The module itself is empty apart from
// WITH_CUDA (1 when csrc/cuda/kv_fork.cu was compiled in) and CUDA_ARCHS (the arch list it was compiled
// for, "8.0,9.0+PTX" style; "" without CUDA); ops are reached through torch.ops.arcopo_fast.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "arcopo_fast C++/CUDA ops (torch.ops.arcopo_fast)",
                                   -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m != nullptr && (PyModule_AddIntConstant(m, "WITH_CUDA", ARCOPO_WITH_CUDA) < 0 ||
                       PyModule_AddStringConstant(m, "CUDA_ARCHS", ARCOPO_CUDA_ARCHS) < 0)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
