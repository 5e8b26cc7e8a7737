// XLA:CPU FFI kernel: y = x · W for a ternary W held as 2-bit codes in uint32 words.
//
// Built and registered by fcp_jax/models/ternary_kernel.py (which documents the layout):
//   x      f32 [M, K]
//   words  u32 [T, Q, 16]   word [t, q, j] bits 2f..2f+1 = T[16q + f, 16t + j] + 1
//   scale  f32 [A, 16 T]    W[k, n] = scale[k / (K / A), n] · T[k, n]; (K / A) % 16 == 0
//   y      f32 [M, N]       N <= 16 T
// Codes are decoded in registers, one 16-column tile at a time, and never written out.
// Field f is masked in place, (T+1)·4^f, and 4^f subtracted, T·4^f, both exact; x is
// divided by 4^f beforehand (f < 15, exact above 2^-98; field 15 is shifted down
// instead), so each weight costs an and, a convert, a subtract and one FMA per row of x.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;   // Columns per tile: one vector of f32.
constexpr int kFields = 16;  // 2-bit codes per uint32 word (along K).
constexpr int kRows = 8;     // Rows of x per pass over a tile's codes.
constexpr int64_t kParallelWork = int64_t{1} << 21;  // Multiply-adds worth a thread.

typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vu __attribute__((vector_size(kLanes * 4)));

struct Problem {
  const float* xb;       // x regrouped: blocks of kRows rows, each [Q, rows, 16] / 4^f
  const uint32_t* words;  // [T, Q, 16]
  const float* scale;    // [A, 16 T]
  float* y;              // [M, N]
  int64_t m, n, q, tiles, groups, group_words;
};

// One tile of 16 columns for MB rows of x starting at m0.
template <int MB>
void Tile(const Problem& p, int64_t m0, int64_t t) {
  constexpr int kAcc = MB >= 8 ? 1 : 8 / MB;  // Independent FMA chains per row.
  const uint32_t* w = p.words + t * p.q * kLanes;
  const float* xb = p.xb + m0 * p.q * kFields;
  vf out[MB];
  for (int r = 0; r < MB; ++r) out[r] = vf{};
  for (int64_t g = 0; g < p.groups; ++g) {
    vf acc[MB][kAcc];
    for (int r = 0; r < MB; ++r)
      for (int j = 0; j < kAcc; ++j) acc[r][j] = vf{};
    const int64_t q1 = std::min(p.q, (g + 1) * p.group_words);
    for (int64_t q = g * p.group_words; q < q1; ++q) {
      vi v;
      std::memcpy(&v, w + q * kLanes, sizeof(v));
      const float* xq = xb + q * MB * kFields;
      for (int f = 0; f < kFields; ++f) {
        const vf c = f == kFields - 1
                         ? __builtin_convertvector((vu)v >> 30, vf) - 1.0f
                         : __builtin_convertvector(v & (3 << (2 * f)), vf) -
                               static_cast<float>(1u << (2 * f));
        for (int r = 0; r < MB; ++r) acc[r][f % kAcc] += xq[r * kFields + f] * c;
      }
    }
    vf s;
    std::memcpy(&s, p.scale + g * p.tiles * kLanes + t * kLanes, sizeof(s));
    for (int r = 0; r < MB; ++r) {
      vf sum = acc[r][0];
      for (int j = 1; j < kAcc; ++j) sum += acc[r][j];
      out[r] += sum * s;
    }
  }
  const int64_t n0 = t * kLanes;
  const int64_t valid = std::min<int64_t>(kLanes, p.n - n0);
  for (int r = 0; r < MB; ++r)
    std::memcpy(p.y + (m0 + r) * p.n + n0, &out[r], valid * sizeof(float));
}

template <int MB>
void Tiles(const Problem& p, int64_t m0, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) Tile<MB>(p, m0, t);
}

// Tiles [t0, t1) for every row of x.
void Columns(const Problem& p, int64_t t0, int64_t t1) {
  int64_t m0 = 0;
  for (; m0 + kRows <= p.m; m0 += kRows) Tiles<kRows>(p, m0, t0, t1);
  switch (p.m - m0) {
    case 7: Tiles<7>(p, m0, t0, t1); break;
    case 6: Tiles<6>(p, m0, t0, t1); break;
    case 5: Tiles<5>(p, m0, t0, t1); break;
    case 4: Tiles<4>(p, m0, t0, t1); break;
    case 3: Tiles<3>(p, m0, t0, t1); break;
    case 2: Tiles<2>(p, m0, t0, t1); break;
    case 1: Tiles<1>(p, m0, t0, t1); break;
  }
}

// Work shared by the calling thread and the pool: chunks of tiles taken in turn. A task
// that starts after the last chunk is taken finds nothing to do, so the caller only
// waits for chunks already running.
struct Shared {
  Problem p;
  std::vector<float> xb;
  int64_t chunk = 1, chunks = 0;
  std::atomic<int64_t> next{0}, done{0};

  void Work() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      Columns(p, c * chunk, std::min(p.tiles, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                ffi::Buffer<ffi::U32> words, ffi::Buffer<ffi::F32> scale,
                ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = words.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || sd.size() != 2 || y->dimensions().size() != 2)
    return ffi::Error::InvalidArgument("ternary_matmul: x, words, scale, y need ranks 2, 3, 2, 2.");
  auto state = std::make_shared<Shared>();
  Problem& p = state->p;
  const int64_t k = xd[1];
  p.m = xd[0];
  p.tiles = wd[0];
  p.q = wd[1];
  p.groups = sd[0];
  p.n = y->dimensions()[1];
  if (wd[2] != kLanes || sd[1] != p.tiles * kLanes || p.n > p.tiles * kLanes ||
      p.q * kFields < k || p.groups < 1 || k % p.groups ||
      (p.groups > 1 && (k / p.groups) % kFields) || y->dimensions()[0] != p.m)
    return ffi::Error::InvalidArgument("ternary_matmul: inconsistent shapes.");
  p.group_words = p.groups > 1 ? k / p.groups / kFields : p.q;
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();

  // x regrouped so that a tile reads its rows' 16 values per word contiguously:
  // block b (rows 8b ..) is [Q, rows, 16] at offset 8b·Q·16, value x[m, 16q+f] / 4^f.
  state->xb.assign(p.m * p.q * kFields, 0.0f);
  const float* xs = x.typed_data();
  for (int64_t b = 0; b < p.m; b += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, p.m - b);
    float* dst = state->xb.data() + b * p.q * kFields;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t kk = 0; kk < k; ++kk) {
        const int f = static_cast<int>(kk % kFields);
        const float inv = f == kFields - 1 ? 1.0f : 1.0f / static_cast<float>(1u << (2 * f));
        dst[((kk / kFields) * rows + r) * kFields + f] = xs[(b + r) * k + kk] * inv;
      }
  }
  p.xb = state->xb.data();
  p.words = words.typed_data();
  p.scale = scale.typed_data();
  p.y = y->typed_data();

  // Small products run on the calling thread: waking a worker costs more than it saves.
  const int64_t threads =
      p.m * k * p.n < kParallelWork ? 1 : std::max<int64_t>(1, pool.num_threads());
  state->chunks = std::min(p.tiles, 4 * threads);
  state->chunk = (p.tiles + state->chunks - 1) / state->chunks;
  state->chunks = (p.tiles + state->chunk - 1) / state->chunk;
  for (int64_t i = 1; i < std::min(threads, state->chunks); ++i)
    pool.Schedule([state] { state->Work(); });
  state->Work();
  while (state->done.load(std::memory_order_acquire) < state->chunks)
    std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FcpTernaryMatmul, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::U32>>()   // words
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y
