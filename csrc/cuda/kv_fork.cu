// CUDA implementation of arcopo_fast::kv_fork_ (schema and checks: csrc/kv_fork.cpp).
//
// One launch copies c[dst_rows[j], :n] <- c[src_rows[j], :n] for every cache tensor c and pair j. Each
// (tensor, pair) copy is one contiguous byte span (dims after the row dim are contiguous), copied with the
// widest access (16/8/4/2/1 bytes) that the source and destination addresses share, after a head of at
// most 15 bytes; the tail is copied bytewise.
//
// Pointer table transport (why it is capture-safe): the per-tensor table (base pointer, row stride, span,
// rows) is passed BY VALUE as a kernel parameter struct of at most 4 KB (ForkTable, kMaxTensors = 128
// tensors). No device buffer, no host->device memcpy, no pinned staging and no host sync: under CUDA graph
// capture the parameters are copied into the graph node, so a replay uses the same cache tensors (the
// usual CUDA-graph contract for static buffers) while the row indices are read from device memory at
// replay time. More than 128 tensors take ceil(T / 128) launches (the 1.3B model has 30 layers x K, V =
// 60 tensors: one launch).
//
// Index checks on CUDA (no host sync): every block checks its own pair's rows against its tensor's row
// count, and the first tensor's first block of pair j checks that dst_rows[j] is distinct from every other
// destination and from every source (O(pairs) loads per pair, from L2). A violation is a device-side
// assert (printf + CUDA_KERNEL_ASSERT), reported as an error at the next synchronizing call, like torch's
// own index kernels; an out-of-range block never touches memory. ARCOPO_KV_FORK_CHECK=1 adds the host
// checks with readable ValueErrors (a sync; not inside graph capture).
#include "../kv_fork.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>

namespace arcopo_fast {
namespace {

constexpr int kMaxTensors = 128;  // per launch; keeps the parameter struct under the 4 KB limit
constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // words in flight per thread per iteration (16 KB per block with 16-byte words)

struct ForkTable {
  char* base[kMaxTensors];           // caches[i].data_ptr(): [rows_i, tokens_i, ...]
  int64_t row_stride[kMaxTensors];   // bytes between rows of caches[i]
  int64_t span[kMaxTensors];         // bytes per (tensor, pair) copy: n_tokens * token bytes of caches[i]
  int32_t rows[kMaxTensors];         // caches[i].size(0), for the in-kernel range check
};
static_assert(sizeof(ForkTable) + 64 <= 4096, "kernel parameters must stay within 4 KB");

template <int W>
struct Word;
template <>
struct Word<16> { using T = uint4; };
template <>
struct Word<8> { using T = uint2; };
template <>
struct Word<4> { using T = uint32_t; };
template <>
struct Word<2> { using T = uint16_t; };
template <>
struct Word<1> { using T = uint8_t; };

// Block-cooperative copy of `bytes` bytes; src and dst agree modulo W. Blocks chunk0, chunk0 + chunks, ...
// of this copy take strided pieces of kThreads * kUnroll words; block chunk0 == 0 also copies head and tail.
template <int W>
__device__ __forceinline__ void copy_span(char* __restrict__ dst,              // [bytes]
                                          const char* __restrict__ src,        // [bytes]
                                          int64_t bytes, int chunk0, int chunks) {
  using V = typename Word<W>::T;
  int64_t head = (W - (reinterpret_cast<uintptr_t>(src) & (W - 1))) & (W - 1);  // bytes up to W-alignment
  if (head > bytes) head = bytes;
  const int64_t nwords = (bytes - head) / W;
  const V* __restrict__ s = reinterpret_cast<const V*>(src + head);  // [nwords]
  V* __restrict__ d = reinterpret_cast<V*>(dst + head);               // [nwords]
  constexpr int64_t kStep = int64_t{kThreads} * kUnroll;
  for (int64_t base = chunk0 * kStep; base < nwords; base += chunks * kStep) {
    V r[kUnroll];
    // All loads first, then all stores: kUnroll independent loads in flight per thread.
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads + threadIdx.x;
      if (i < nwords) r[u] = s[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads + threadIdx.x;
      if (i < nwords) d[i] = r[u];
    }
  }
  if (chunk0 == 0) {
    const int64_t tail0 = head + nwords * W;  // < W bytes from here to the end
    if (threadIdx.x < head) dst[threadIdx.x] = src[threadIdx.x];
    if (threadIdx.x < bytes - tail0) dst[tail0 + threadIdx.x] = src[tail0 + threadIdx.x];
  }
}

// grid = (chunks * num_pairs, tensors in this launch); block = kThreads.
// blockIdx.x = chunk * num_pairs + pair; blockIdx.y = tensor. Block (chunk, pair, tensor) copies the
// pieces chunk, chunk + chunks, ... of that tensor's span for that pair (a grid-stride loop within one
// copy). Chunk-major order puts the blocks of all pairs for the same piece next to each other, so when
// several children share a parent (the fork's case) they read the same source bytes at about the same
// time and all but the first read hit L2: HBM traffic drops towards (1 + 1/children) x the bytes written.
__global__ void __launch_bounds__(kThreads)
    kv_fork_kernel(const ForkTable table,
                   const int64_t* __restrict__ src_rows,  // [num_pairs]
                   const int64_t* __restrict__ dst_rows,  // [num_pairs]
                   int64_t num_pairs, int chunks, int tensor0, bool check_distinct) {
  const int t = blockIdx.y;
  const int64_t pair = blockIdx.x % num_pairs;
  const int chunk = static_cast<int>(blockIdx.x / num_pairs);
  const int64_t s = src_rows[pair];
  const int64_t d = dst_rows[pair];
  const int64_t rows = table.rows[t];
  if (!(0 <= s && s < rows && 0 <= d && d < rows)) {
    if (threadIdx.x == 0) {
      printf("kv_fork_: pair %lld (src_rows = %lld, dst_rows = %lld) is out of range for caches[%d] with %lld rows\n",
             static_cast<long long>(pair), static_cast<long long>(s), static_cast<long long>(d), tensor0 + t,
             static_cast<long long>(rows));
    }
    CUDA_KERNEL_ASSERT(0 <= s && s < rows && 0 <= d && d < rows);
    return;  // never copy through a bad index, even where device asserts are compiled out
  }
  if (check_distinct && t == 0 && chunk == 0) {
    for (int64_t k = threadIdx.x; k < num_pairs; k += kThreads) {
      const bool ok = (k == pair || dst_rows[k] != d) && src_rows[k] != d;
      if (!ok) {
        printf("kv_fork_: dst_rows[%lld] = %lld repeats a destination or is a source row (pair %lld)\n",
               static_cast<long long>(pair), static_cast<long long>(d), static_cast<long long>(k));
      }
      CUDA_KERNEL_ASSERT(ok);
    }
  }
  const int64_t span = table.span[t];
  if (span == 0) return;
  char* const base = table.base[t];
  const char* src = base + s * table.row_stride[t];
  char* dst = base + d * table.row_stride[t];
  // Widest word width on which src and dst agree (they differ by (d - s) * row_stride bytes).
  const uintptr_t diff = reinterpret_cast<uintptr_t>(src) ^ reinterpret_cast<uintptr_t>(dst);
  if ((diff & 15) == 0) {
    copy_span<16>(dst, src, span, chunk, chunks);
  } else if ((diff & 7) == 0) {
    copy_span<8>(dst, src, span, chunk, chunks);
  } else if ((diff & 3) == 0) {
    copy_span<4>(dst, src, span, chunk, chunks);
  } else if ((diff & 1) == 0) {
    copy_span<2>(dst, src, span, chunk, chunks);
  } else {
    copy_span<1>(dst, src, span, chunk, chunks);
  }
}

void kv_fork_cuda(at::TensorList caches, const at::Tensor& src_rows, const at::Tensor& dst_rows,
                  int64_t n_tokens) {
  const std::vector<CacheSpan> spans = check_metadata(caches, src_rows, dst_rows, n_tokens);
  if (debug_checks_enabled()) {
    // NOTE(kv_fork_): host sync (device -> host copy of the indices); debug mode only, not capturable.
    check_row_values(caches, src_rows.cpu(), dst_rows.cpu());
  }
  const int64_t T = static_cast<int64_t>(spans.size()), P = src_rows.size(0);
  int64_t max_span = 0;
  for (const auto& sp : spans) {
    max_span = std::max(max_span, sp.span);
    KV_CHECK(sp.rows <= INT32_MAX, "caches must have fewer than 2^31 rows on CUDA, got ", sp.rows);
  }
  if (T == 0 || P == 0 || max_span == 0) return;

  const c10::cuda::CUDAGuard guard(caches[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(caches[0].device().index());
  // Index tensors are tiny; .contiguous() is a no-op for the usual 1-D tensors (stream-ordered otherwise).
  const at::Tensor s_t = src_rows.contiguous(), d_t = dst_rows.contiguous();

  int sms = 0;  // a cached attribute query: no sync, allowed during capture
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, caches[0].device().index()));
  // Blocks per copy (`chunks`): at most one per piece of kThreads * kUnroll 16-byte words, at least 8 per SM
  // over all copies when there are that many pieces (2 waves: ptxas gives the kernel 52 registers on
  // sm_90, so 4 blocks of 256 threads fit on an SM), and at most
  // kMaxIters pieces per block, so that the last wave's imbalance stays small on long copies (18720-token
  // prefix: 57.5 MB per copy -> 220 blocks of 16 pieces per copy).
  constexpr int64_t kMaxIters = 16;
  const int64_t step_bytes = int64_t{kThreads} * kUnroll * 16;
  const int64_t pieces = (max_span + step_bytes - 1) / step_bytes;
  const int64_t copies = P * std::min<int64_t>(T, kMaxTensors);
  const int64_t fill = (int64_t{sms} * 8 + copies - 1) / copies;
  const int64_t chunks = std::min(pieces, std::max(fill, (pieces + kMaxIters - 1) / kMaxIters));
  KV_CHECK(chunks * P <= INT32_MAX, "too many pairs for one launch: ", P);

  for (int64_t t0 = 0; t0 < T; t0 += kMaxTensors) {
    const int64_t nt = std::min<int64_t>(kMaxTensors, T - t0);
    ForkTable table{};
    for (int64_t i = 0; i < nt; ++i) {
      const CacheSpan& sp = spans[t0 + i];
      table.base[i] = sp.base;
      table.row_stride[i] = sp.row_stride;
      table.span[i] = sp.span;
      table.rows[i] = static_cast<int32_t>(sp.rows);
    }
    const dim3 grid(static_cast<unsigned>(chunks * P), static_cast<unsigned>(nt));
    kv_fork_kernel<<<grid, kThreads, 0, stream>>>(table, s_t.data_ptr<int64_t>(), d_t.data_ptr<int64_t>(), P,
                                                  static_cast<int>(chunks), static_cast<int>(t0), t0 == 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(arcopo_fast, CUDA, m) { m.impl("kv_fork_", &kv_fork_cuda); }

}  // namespace arcopo_fast
