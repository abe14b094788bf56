// Fused iRPE attention for the CPU: softmax(scale q k^T + iRPE logits + padding) v (+ iRPE on
// values), by blocks of query rows, each block handled in one pass while it sits in cache (the
// pure-PyTorch row-chunked kernel, detr_irpe/irpe/chunked.py, makes a dozen passes, one per tensor op).
//
// The iRPE terms (see Kind below) come as lookup tables plus (L, L) int16 bucket ids; a term's
// per-pair values are read straight from its table (bias), from the block's queries projected
// on every bucket (contextual on keys), or from the keys of the head projected on every bucket,
// once per head and thread (contextual on queries). Nothing of size L x L x head_dim, and no
// (B, H, L, L) tensor, is ever formed. Backward recomputes each block's probabilities from the
// saved log-sum-exp, as flash attention does, and returns one gradient per term (summed over
// batch and shared heads by the caller, detr_irpe/irpe/native.py). Attention dropout masks come
// from a hash (dropout_multipliers), so backward redraws them rather than keeping them.
//
// Matrix products go to the BLAS that torch links (sgemm_ / dgemm_), called single-threaded
// from inside at::parallel_for: forward splits over (batch, head, row block), backward over
// (batch, head), since every row block adds to the key-side gradients of its head.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define DETR_IRPE_PERMUTES 1
#endif

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
}

namespace {

using at::Tensor;

// Row-major C (m x n) = alpha op(A) op(B) + beta C, via the column-major BLAS (C^T = op(B)^T op(A)^T).
inline void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int lda,
                 const float* B, int ldb, float beta, float* C, int ldc) {
  const char a = ta ? 'T' : 'N', b = tb ? 'T' : 'N';
  sgemm_(&b, &a, &n, &m, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

inline void gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* A, int lda,
                 const double* B, int ldb, double beta, double* C, int ldc) {
  const char a = ta ? 'T' : 'N', b = tb ? 'T' : 'N';
  dgemm_(&b, &a, &n, &m, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

// The row loops below (max, exp and sum) use GCC / Clang vector extensions of one register:
// 16 floats with AVX-512, else 8 (one AVX2 register, two SSE / NEON ones). Wider vectors than
// the machine's registers are split by the compiler, and on AVX2 that made the exp twice as slow.
// Plain loops with a running max or sum are not vectorised well, since each step would wait for
// the previous one.
#if defined(__AVX512F__)
#define DETR_IRPE_VECTOR_BYTES 64
#else
#define DETR_IRPE_VECTOR_BYTES 32
#endif
typedef float vfloat __attribute__((vector_size(DETR_IRPE_VECTOR_BYTES)));
typedef int32_t vint __attribute__((vector_size(DETR_IRPE_VECTOR_BYTES)));
typedef uint32_t vuint __attribute__((vector_size(DETR_IRPE_VECTOR_BYTES)));
constexpr int kLanes = DETR_IRPE_VECTOR_BYTES / 4;
// Room past the end of a row block for the last full-vector store of a gather (gather_values).
constexpr int64_t kGatherSlack = kLanes;

inline vfloat load(const float* x) {
  vfloat v;
  std::memcpy(&v, x, sizeof(v));
  return v;
}

inline void store(float* x, vfloat v) { std::memcpy(x, &v, sizeof(v)); }

inline vfloat broadcast(float x) { return vfloat{} + x; }

// exp(x) for x <= 0: a Cephes-style polynomial (about 1 ulp). Arguments are first raised to
// -86, where exp is still a normal number (subnormals are over a hundred times slower on x86,
// and far below the row's largest weight, exp(0) = 1).
inline vfloat exp_nonpositive(vfloat x) {
  x = x < -86.f ? broadcast(-86.f) : x;
  const vfloat r = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round(x / ln 2)
  const vint bits = (__builtin_convertvector(r, vint) + 127) << 23;     // 2^r
  x = x - r * 0.693359375f + r * 2.12194440e-4f;
  const vfloat z = x * x;
  vfloat p = 1.9875691500e-4f * x + 1.3981999507e-3f;
  p = p * x + 8.3334519073e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  p = p * z + x + 1.f;
  return p * (vfloat)bits;
}

inline double exp_nonpositive(double x) { return std::exp(std::max(x, -700.0)); }

// The first n <= kLanes floats of x as a vector, the other lanes set to fill; and the reverse.
// Rows are rarely a multiple of kLanes long (850 at 25x34), and a scalar tail of up to 15 elements
// costs as much as the rest of the row.
inline vfloat load_head(const float* x, int64_t n, float fill) {
  float lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = l < n ? x[l] : fill;
  return load(lanes);
}

inline void store_head(float* x, int64_t n, vfloat v) {
  float lanes[kLanes];
  store(lanes, v);
  std::memcpy(x, lanes, n * sizeof(float));
}

constexpr float kLowest = -std::numeric_limits<float>::infinity();

// x[j] = exp(x[j] - shift) * keep[j] (keep: 0 on padded keys, or null); returns the sum.
inline float exp_row(float* x, int64_t n, float shift, const float* keep) {
  static const float ones[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};  // >= kLanes
  vfloat acc0{}, acc1{};
  const vfloat s = broadcast(shift);
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    vfloat p0 = exp_nonpositive(load(x + j) - s), p1 = exp_nonpositive(load(x + j + kLanes) - s);
    if (keep) p0 *= load(keep + j), p1 *= load(keep + j + kLanes);
    store(x + j, p0), store(x + j + kLanes, p1);
    acc0 += p0, acc1 += p1;
  }
  for (; j < n; j += kLanes) {  // one or two vectors left, the last one partial
    const int64_t m = std::min<int64_t>(kLanes, n - j);
    const vfloat p = exp_nonpositive(load_head(x + j, m, kLowest) - s) * load_head(keep ? keep + j : ones, m, 0.f);
    store_head(x + j, m, p);
    acc0 += p;
  }
  acc0 += acc1;
  float sum = 0.f;
  for (int l = 0; l < kLanes; ++l) sum += acc0[l];
  return sum;
}

inline double exp_row(double* x, int64_t n, double shift, const double* keep) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    double p = exp_nonpositive(x[j] - shift);
    if (keep) p *= keep[j];
    x[j] = p;
    sum += p;
  }
  return sum;
}

inline float row_max(const float* x, int64_t n) {
  vfloat m0 = broadcast(kLowest), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 4 * kLanes <= n; j += 4 * kLanes) {
    const vfloat a = load(x + j), b = load(x + j + kLanes), c = load(x + j + 2 * kLanes), d = load(x + j + 3 * kLanes);
    m0 = a > m0 ? a : m0, m1 = b > m1 ? b : m1, m2 = c > m2 ? c : m2, m3 = d > m3 ? d : m3;
  }
  for (; j < n; j += kLanes) {
    const vfloat a = load_head(x + j, std::min<int64_t>(kLanes, n - j), kLowest);
    m0 = a > m0 ? a : m0;
  }
  m0 = m1 > m0 ? m1 : m0, m2 = m3 > m2 ? m3 : m2, m0 = m2 > m0 ? m2 : m0;
  float m = kLowest;
  for (int l = 0; l < kLanes; ++l) m = std::max(m, m0[l]);
  return m;
}

inline double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// Attention dropout. Key j of query row r (numbered (b * H + h) * L + i) is kept when a hash of
// (seed, r, j) is at least p * 2^32: a counter-based draw, so that backward rebuilds forward's
// masks instead of storing them, and float and double draw the same ones.
struct Dropout {
  double p = 0;
  uint64_t seed = 0;
  bool on() const { return p > 0; }
};

inline uint64_t mix64(uint64_t x) {  // the splitmix64 finaliser
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

template <typename U>
inline U mix32(U x) {  // a 32-bit integer hash (two multiplies), on one number or a vector of lanes
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

// m[j] = 1 / (1 - p) where key j of query row r is kept, else 0, for j < L.
template <typename T>
void dropout_multipliers(T* m, int64_t L, const Dropout& drop, int64_t r) {
  const uint32_t key = static_cast<uint32_t>(mix64(drop.seed + 0x9E3779B97F4A7C15ull * (uint64_t(r) + 1)));
  const uint32_t threshold = static_cast<uint32_t>(std::min(drop.p * 4294967296.0, 4294967295.0));
  const T kept = T(1 / (1 - drop.p));
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    vuint lane;
    for (int l = 0; l < kLanes; ++l) lane[l] = l;
    for (; j + kLanes <= L; j += kLanes) {
      const vuint h = mix32<vuint>(key + (lane + uint32_t(j)) * 0x9E3779B9u);
      const vfloat keep = h >= threshold ? broadcast(kept) : broadcast(0.f);
      store(m + j, keep);
    }
  }
  for (; j < L; ++j) m[j] = mix32<uint32_t>(key + uint32_t(j) * 0x9E3779B9u) >= threshold ? kept : T(0);
}

// Bucket ids: int16 halves the bytes read per logit (the ids of a head are read once per head).
// Tables of more than kMaxBuckets buckets are refused (make_terms); the attention sends them to
// the row-chunked kernel instead (choose_impl in detr_irpe/irpe/attention.py).
using bucket_t = int16_t;
constexpr int64_t kMaxBuckets = int64_t(1) << 15;

// The kinds of iRPE term, as native.py hands them over (tables of H' = 1 or H heads):
enum Kind : int64_t {
  kBias = 0,    // logit += table[h', ids[i, j]]                          table (H', nb)
  kRowCtx = 1,  // logit += scale q_i . table[h', :, ids[i, j]]            table (H', D, nb)
  kColCtx = 2,  // logit += scale k_j . table[h', :, ids[i, j]]            table (H', D, nb)
  kValue = 3,   // out_i += sum_j a_ij table[h', ids[i, j], :]             table (H', nb, D)
};

template <typename T>
struct Term {
  Kind kind;
  const T* table;
  int64_t head_stride;  // of table; 0 for a table shared by all heads
  const bucket_t* ids;  // (L, L); for a term on queries already transposed: ids[i, j] = b(j, i)
  int64_t nb;
  T* grad = nullptr;  // bias (B, H, nb), row and column ctx (B, H, D, nb), value (B, H, nb, D)
  // Separable ids (product and cross methods, no skip token; null otherwise), for an (gh, gw) grid:
  // ids[(yi, xi), (yj, xj)] = rows[yi, yj] * side + cols[xi, xj], rows in [0, ny).
  const bucket_t* rows = nullptr;
  const bucket_t* cols = nullptr;
  int64_t gh = 0, gw = 0, side = 0, ny = 0, nx = 0;  // nx: column buckets, cols in [0, nx)
  bool logit() const { return kind != kValue; }
  const T* head(int64_t h) const { return table + h * head_stride; }
};

// One term as native.py hands it over: kind, table, (L, L) ids, and the separable factors of the
// ids (row part, column part, side; empty tensors when they do not separate).
using TermSpec = std::tuple<int64_t, Tensor, Tensor, Tensor, Tensor, int64_t>;

template <typename T>
std::vector<Term<T>> make_terms(const std::vector<TermSpec>& specs, int64_t H, int64_t L, int64_t D) {
  std::vector<Term<T>> terms;
  for (const TermSpec& spec : specs) {
    const int64_t kind = std::get<0>(spec), side = std::get<5>(spec);
    const Tensor &table = std::get<1>(spec), &ids = std::get<2>(spec), &fr = std::get<3>(spec), &fc = std::get<4>(spec);
    TORCH_CHECK(kind >= kBias && kind <= kValue, "unknown iRPE term kind");
    TORCH_CHECK(table.is_contiguous(), "iRPE tables must be contiguous");
    TORCH_CHECK(ids.scalar_type() == at::kShort && ids.is_contiguous() && ids.dim() == 2 && ids.size(0) == L &&
                    ids.size(1) == L,
                "bucket ids must be contiguous int16 (L, L)");
    Term<T> term;
    term.kind = static_cast<Kind>(kind);
    term.table = table.data_ptr<T>();
    term.ids = ids.data_ptr<bucket_t>();
    const int64_t heads = table.size(0);
    TORCH_CHECK(heads == 1 || heads == H, "iRPE table must have 1 or H heads");
    term.nb = term.kind == kValue ? table.size(1) : table.size(-1);
    TORCH_CHECK(term.nb <= kMaxBuckets, "iRPE table of ", term.nb, " buckets: the kernel's int16 bucket ids hold at most ",
                kMaxBuckets);
    TORCH_CHECK(term.kind == kBias ? table.dim() == 2
                                   : table.dim() == 3 && table.size(term.kind == kValue ? 2 : 1) == D,
                "iRPE table has the wrong shape");
    term.head_stride = heads == 1 ? 0 : table.stride(0);
    if (fr.numel() > 0 && term.kind != kColCtx) {
      TORCH_CHECK(fr.scalar_type() == at::kShort && fc.scalar_type() == at::kShort && fr.is_contiguous() &&
                      fc.is_contiguous() && fr.dim() == 2 && fc.dim() == 2 && fr.size(0) == fr.size(1) &&
                      fc.size(0) == fc.size(1) && fr.size(0) * fc.size(0) == L,
                  "bucket factors must be contiguous int16 (gh, gh) and (gw, gw) with gh * gw = L");
      term.rows = fr.data_ptr<bucket_t>(), term.cols = fc.data_ptr<bucket_t>();
      term.gh = fr.size(0), term.gw = fc.size(0), term.side = side;
      // a scan of the raw ids (gh^2 + gw^2 of them): cheaper, per call, than four torch reductions
      const auto [row_min, row_max] = std::minmax_element(term.rows, term.rows + fr.numel());
      const auto [col_min, col_max] = std::minmax_element(term.cols, term.cols + fc.numel());
      term.ny = *row_max + 1, term.nx = *col_max + 1;
      TORCH_CHECK(*row_min >= 0 && *col_min >= 0 && (term.ny - 1) * term.side + term.nx - 1 < term.nb,
                  "bucket factors out of the table's range");
    }
    terms.push_back(term);
  }
  return terms;
}

// A per-thread buffer from torch's CPU allocator (not std::vector), so that memory profilers
// that watch torch allocations see it.
template <typename T>
struct Buffer {
  Tensor storage;
  T* data;
  Buffer(int64_t size, const at::TensorOptions& options)
      : storage(at::empty({std::max<int64_t>(size, 1)}, options)), data(storage.template data_ptr<T>()) {}
};

// Per-thread scratch: per term, rows x nb for the block's queries (row ctx: their projections
// and the gradient; value: the block's bucket masses and dO r^T) or L x nb for the keys of one
// head (column ctx: their projections, of head projected_bh, and the gradient).
template <typename T>
struct Scratch {
  std::vector<std::vector<T>> a, b;
  std::vector<T> work;  // of gather_values / term_sums
  std::vector<T> values;  // a row's values of one term, L + kGatherSlack
  int64_t projected_bh = -1;
  Scratch(const std::vector<Term<T>>& terms, int64_t rows, int64_t L) : values(L + kGatherSlack) {
    int64_t size = 1;
    for (const auto& term : terms) {
      const int64_t n = term.kind == kColCtx ? L * term.nb : term.kind == kBias ? 0 : rows * term.nb;
      a.emplace_back(n);
      b.emplace_back(n);
      size = std::max({size, 4 * term.nb, term.ny * term.gw});
    }
    work.resize(size);
  }
};

// acc[n] += sum_j x[j] [ids[j] = n]. Four interleaved accumulators: neighbouring keys mostly
// share a bucket, and with one accumulator every add would wait for the previous one.
template <typename T>
inline void bucket_sums(const T* x, const bucket_t* id, int64_t L, int64_t nb, T* acc4, T* acc) {
  std::fill(acc4, acc4 + 4 * nb, T(0));
  int64_t j = 0;
  for (; j + 4 <= L; j += 4) {
    acc4[id[j]] += x[j];
    acc4[nb + id[j + 1]] += x[j + 1];
    acc4[2 * nb + id[j + 2]] += x[j + 2];
    acc4[3 * nb + id[j + 3]] += x[j + 3];
  }
  for (; j < L; ++j) acc4[id[j]] += x[j];
  for (int64_t n = 0; n < nb; ++n) acc[n] += acc4[n] + acc4[nb + n] + acc4[2 * nb + n] + acc4[3 * nb + n];
}

// dst[j] = row[ids[i, j]] for the L keys j of query i: the gather of a bias table or of a
// query's per-bucket projections; work: ny * gw scratch. Separable ids: the values of one key
// row are a window of the (ny, gw) table e[r, xj] = row[r * side + cols[xi, xj]], so they are
// copied row by row instead of gathered. The AVX-512 float version below may also write up to
// 15 values past dst + L (kGatherSlack).
template <typename T>
inline void gather_values(T* dst, const T* row, const Term<T>& term, int64_t i, int64_t L, T* work) {
  if (!term.rows) {
    const bucket_t* id = term.ids + i * L;
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) dst[j] = row[id[j]];
    return;
  }
  const int64_t gw = term.gw, yi = i / gw, xi = i % gw;
  const bucket_t *cols = term.cols + xi * gw, *rows = term.rows + yi * term.gh;
  for (int64_t r = 0; r < term.ny; ++r) {
    const T* m = row + r * term.side;
    T* e = work + r * gw;
#pragma omp simd
    for (int64_t x = 0; x < gw; ++x) e[x] = m[cols[x]];
  }
  for (int64_t y = 0; y < term.gh; ++y) {  // a vector loop: a memcpy call per key row costs more
    const T* src = work + rows[y] * gw;
    T* out = dst + y * gw;
#pragma omp simd
    for (int64_t x = 0; x < gw; ++x) out[x] = src[x];
  }
}


#ifdef DETR_IRPE_PERMUTES
// The float gather with AVX-512 permutes: a table of at most 32 numbers fits in two registers,
// and one vpermt2ps picks 16 of them, where the loops above issue one load per key. DETR's
// configurations have few enough buckets: 9 per axis for product / cross at ratio 2.0 (13 at
// 3.0), 9 in all for euc. Every store is a full vector (a masked store that a later load
// overlaps stalls that load until it retires); the last one of a key row runs into the next
// row, which overwrites it.
inline __mmask16 first_lanes(int64_t n) {
  return n <= 0 ? __mmask16(0) : n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

// dst[0:16] = table[idx[0:n]] (n <= 16 ids read), table = lo (entries 0-15), hi (16-31).
inline void permute_store(float* dst, const bucket_t* idx, int64_t n, __m512 lo, __m512 hi) {
  const __m512i i = _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(first_lanes(n), idx));
  _mm512_storeu_ps(dst, _mm512_permutex2var_ps(lo, i, hi));
}

inline void gather_values(float* dst, const float* row, const Term<float>& term, int64_t i, int64_t L,
                          float* work) {
  if (term.rows ? term.nx > 32 : term.nb > 32) return gather_values<float>(dst, row, term, i, L, work);
  if (!term.rows) {
    const __m512 lo = _mm512_maskz_loadu_ps(first_lanes(term.nb), row);
    const __m512 hi = _mm512_maskz_loadu_ps(first_lanes(term.nb - 16), row + 16);
    const bucket_t* id = term.ids + i * L;
    for (int64_t j = 0; j < L; j += 16) permute_store(dst + j, id + j, L - j, lo, hi);
    return;
  }
  const int64_t gw = term.gw, yi = i / gw, xi = i % gw;
  const bucket_t *cols = term.cols + xi * gw, *rows = term.rows + yi * term.gh;
  const __mmask16 lo_lanes = first_lanes(term.nx), hi_lanes = first_lanes(term.nx - 16);
  for (int64_t y = 0; y < term.gh; ++y) {  // key row y: row[rows[yi, y] * side + cols[xi, :]]
    const float* m = row + rows[y] * term.side;
    const __m512 lo = _mm512_maskz_loadu_ps(lo_lanes, m), hi = _mm512_maskz_loadu_ps(hi_lanes, m + 16);
    for (int64_t x = 0; x < gw; x += 16) permute_store(dst + y * gw + x, cols + x, gw - x, lo, hi);
  }
}
#endif

// s[j] = (or +=, when add) row[ids[i, j]] for every key j of query i; values: L + kGatherSlack
// scratch, work: as gather_values. The first term of a row is gathered straight into it.
template <typename T>
inline void term_gather(T* s, bool add, const T* row, const Term<T>& term, int64_t i, int64_t L, T* values,
                        T* work) {
  if (!add) return gather_values(s, row, term, i, L, work);
  gather_values(values, row, term, i, L, work);
#pragma omp simd
  for (int64_t j = 0; j < L; ++j) s[j] += values[j];
}

// acc[n] += sum_j x[j] [ids[i, j] = n]; work: max(4 nb, ny gw) scratch. Separable ids: key rows
// of one row bucket are summed first (contiguous adds), then each (row bucket, column) once.
template <typename T>
inline void term_sums(const T* x, const Term<T>& term, int64_t i, int64_t L, T* work, T* acc) {
  if (!term.rows) return bucket_sums(x, term.ids + i * L, L, term.nb, work, acc);
  const int64_t gw = term.gw, yi = i / gw, xi = i % gw;
  const bucket_t *cols = term.cols + xi * gw, *rows = term.rows + yi * term.gh;
  std::fill(work, work + term.ny * gw, T(0));
  for (int64_t y = 0; y < term.gh; ++y) {
    T* f = work + rows[y] * gw;
    const T* seg = x + y * gw;
#pragma omp simd
    for (int64_t c = 0; c < gw; ++c) f[c] += seg[c];
  }
  // columns outermost: neighbouring columns often share a bucket, and the ny independent adds
  // of one column hide the latency of the previous column's adds to the same addresses
  for (int64_t c = 0; c < gw; ++c) {
    T* a = acc + cols[c];
    for (int64_t r = 0; r < term.ny; ++r) a[r * term.side] += work[r * gw + c];
  }
}

template <typename T>
struct Padding {
  std::vector<T> add, keep;  // (B, L): -inf / 0 and 0 / 1 on padded / kept keys
  bool any = false;
  Padding(const Tensor& pad, int64_t B, int64_t L) {
    if (!pad.defined() || pad.numel() == 0) return;
    TORCH_CHECK(pad.scalar_type() == at::kBool && pad.is_contiguous() && pad.numel() == B * L,
                "key padding mask must be contiguous bool (B, L)");
    any = true;
    add.assign(B * L, T(0));
    keep.assign(B * L, T(1));
    const bool* p = pad.data_ptr<bool>();
    for (int64_t n = 0; n < B * L; ++n)
      if (p[n]) add[n] = -std::numeric_limits<T>::infinity(), keep[n] = T(0);
  }
  const T* keep_row(int64_t b, int64_t L) const { return any ? keep.data() + b * L : nullptr; }
};

struct Shape {
  int64_t B, H, L, D;
};

// s[j] = (or +=, when add) keys[j, ids[j]]: a contextual term on queries, from the keys'
// projections on every bucket, keys (L, nb).
template <typename T>
inline void column_gather(T* s, bool add, const T* keys, const bucket_t* id, int64_t L, int64_t nb) {
  if (add) {
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) s[j] += keys[j * nb + id[j]];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) s[j] = keys[j * nb + id[j]];
  }
}

// Logits of query rows r0 : r0 + n of head (b, h) into s (n, L, then kGatherSlack spare); leaves each
// row-contextual term's projections of these queries, (n, nb), in scratch.a. The iRPE terms are
// gathered first, and q k^T added onto them by the matrix product (no pass of its own).
template <typename T>
void block_logits(T* s, const T* qh, const T* kh, int64_t r0, int64_t n, const Shape& sh, T scale,
                  const std::vector<Term<T>>& terms, Scratch<T>& scratch, const Padding<T>& pad, int64_t b,
                  int64_t h) {
  const int64_t L = sh.L, D = sh.D, bh = b * sh.H + h;
  for (size_t e = 0; e < terms.size(); ++e) {
    const auto& term = terms[e];
    if (term.kind == kRowCtx)
      gemm(false, false, n, term.nb, D, scale, qh + r0 * D, D, term.head(h), term.nb, T(0), scratch.a[e].data(),
           term.nb);
    if (term.kind == kColCtx && scratch.projected_bh != bh)
      gemm(false, false, L, term.nb, D, scale, kh, D, term.head(h), term.nb, T(0), scratch.a[e].data(), term.nb);
  }
  scratch.projected_bh = bh;
  bool gathered = false;
  for (int64_t t = 0; t < n; ++t) {
    T* row = s + t * L;
    const int64_t i = r0 + t;
    bool add = false;  // whether row holds a term already
    for (size_t e = 0; e < terms.size(); ++e) {
      const auto& term = terms[e];
      if (term.kind == kBias) {
        term_gather(row, add, term.head(h), term, i, L, scratch.values.data(), scratch.work.data());
      } else if (term.kind == kRowCtx) {
        term_gather(row, add, scratch.a[e].data() + t * term.nb, term, i, L, scratch.values.data(),
                    scratch.work.data());
      } else if (term.kind == kColCtx) {
        column_gather(row, add, scratch.a[e].data(), term.ids + i * L, L, term.nb);
      }
      add = add || term.logit();
    }
    gathered = add;
  }
  gemm(false, true, n, L, D, scale, qh + r0 * D, D, kh, D, gathered ? T(1) : T(0), s, L);
  if (!pad.any) return;
  const T* add = pad.add.data() + b * L;
  for (int64_t t = 0; t < n; ++t) {
    T* row = s + t * L;
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) row[j] += add[j];
  }
}

Shape check_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "q, k, v must be contiguous (B, H, L, D)");
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(), "q, k, v must have one shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v: one dtype");
  TORCH_CHECK(q.size(2) * std::max<int64_t>(q.size(3), 1) < (int64_t(1) << 31), "sequence too long");
  return Shape{q.size(0), q.size(1), q.size(2), q.size(3)};
}

template <typename T>
std::vector<Tensor> forward_impl(const Tensor& q, const Tensor& k, const Tensor& v, double scale_d,
                                 const Tensor& pad_mask, const std::vector<TermSpec>& specs, int64_t rows,
                                 const Dropout& drop) {
  const Shape sh = check_qkv(q, k, v);
  const int64_t B = sh.B, H = sh.H, L = sh.L, D = sh.D;
  const T scale = static_cast<T>(scale_d);
  const auto terms = make_terms<T>(specs, H, L, D);
  const Padding<T> pad(pad_mask, B, L);
  Tensor out = at::empty_like(q), lse = at::empty({B, H, L}, q.options());
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T *op = out.data_ptr<T>(), *lp = lse.data_ptr<T>();
  const int64_t blocks = (L + rows - 1) / rows;

  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    Buffer<T> block(rows * L + kGatherSlack, q.options());
    T* s = block.data;
    std::vector<T> inv(rows), keep(drop.on() ? L : 0);
    Scratch<T> scratch(terms, rows, L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, r0 = (task % blocks) * rows, b = bh / H, h = bh % H;
      const int64_t n = std::min(rows, L - r0);
      const T *qh = qp + bh * L * D, *kh = kp + bh * L * D, *vh = vp + bh * L * D;
      block_logits(s, qh, kh, r0, n, sh, scale, terms, scratch, pad, b, h);
      for (size_t e = 0; e < terms.size(); ++e)
        if (terms[e].kind == kValue) std::fill(scratch.a[e].begin(), scratch.a[e].end(), T(0));
      for (int64_t t = 0; t < n; ++t) {
        T* row = s + t * L;
        const T m = row_max(row, L);
        const T sum = exp_row(row, L, m, pad.keep_row(b, L));
        lp[bh * L + r0 + t] = m + std::log(sum);
        inv[t] = T(1) / sum;
        if (drop.on()) {  // the weights after dropout, for the values and their iRPE alike
          dropout_multipliers(keep.data(), L, drop, bh * L + r0 + t);
#pragma omp simd
          for (int64_t j = 0; j < L; ++j) row[j] *= keep[j];
        }
        for (size_t e = 0; e < terms.size(); ++e) {
          if (terms[e].kind != kValue) continue;
          const int64_t nb = terms[e].nb;
          T* mass = scratch.a[e].data() + t * nb;  // attention weight of each bucket
          term_sums(row, terms[e], r0 + t, L, scratch.work.data(), mass);
          for (int64_t c = 0; c < nb; ++c) mass[c] *= inv[t];
        }
      }
      T* o = op + (bh * L + r0) * D;
      gemm(false, false, n, D, L, T(1), s, L, vh, D, T(0), o, D);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t d = 0; d < D; ++d) o[t * D + d] *= inv[t];
      for (size_t e = 0; e < terms.size(); ++e)
        if (terms[e].kind == kValue)
          gemm(false, false, n, D, terms[e].nb, T(1), scratch.a[e].data(), terms[e].nb, terms[e].head(h), D,
               T(1), o, D);
    }
  });
  return {out, lse};
}

template <typename T>
std::vector<Tensor> backward_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                  const Tensor& lse, const Tensor& grad_out, double scale_d,
                                  const Tensor& pad_mask, const std::vector<TermSpec>& specs, int64_t rows,
                                  const Dropout& drop) {
  const Shape sh = check_qkv(q, k, v);
  const int64_t B = sh.B, H = sh.H, L = sh.L, D = sh.D;
  TORCH_CHECK(out.is_contiguous() && grad_out.is_contiguous() && lse.is_contiguous() &&
                  out.sizes() == q.sizes() && grad_out.sizes() == q.sizes() && lse.numel() == B * H * L,
              "out, grad_out (B, H, L, D) and lse (B, H, L) must be contiguous");
  const T scale = static_cast<T>(scale_d);
  auto terms = make_terms<T>(specs, H, L, D);
  std::vector<Tensor> grads;
  for (auto& term : terms) {
    std::vector<int64_t> size{B, H, term.nb};
    if (term.kind == kRowCtx || term.kind == kColCtx) size = {B, H, D, term.nb};
    if (term.kind == kValue) size = {B, H, term.nb, D};
    grads.push_back(at::zeros(size, q.options()));
    term.grad = grads.back().data_ptr<T>();
  }
  const Padding<T> pad(pad_mask, B, L);
  Tensor gq = at::empty_like(q), gk = at::zeros_like(k), gv = at::zeros_like(v);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *opt = out.data_ptr<T>();
  const T *lp = lse.data_ptr<T>(), *gop = grad_out.data_ptr<T>();
  T *gqp = gq.data_ptr<T>(), *gkp = gk.data_ptr<T>(), *gvp = gv.data_ptr<T>();

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Buffer<T> block(rows * L + kGatherSlack, q.options()), grad_block(rows * L + kGatherSlack, q.options());
    Buffer<T> keep_block(drop.on() ? rows * L : 0, q.options());
    T *p = block.data, *dp = grad_block.data, *keep = keep_block.data;
    std::vector<T> delta(rows);
    Scratch<T> scratch(terms, rows, L);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T *qh = qp + bh * L * D, *kh = kp + bh * L * D, *vh = vp + bh * L * D;
      const T *oh = opt + bh * L * D, *goh = gop + bh * L * D;
      T *gkh = gkp + bh * L * D, *gvh = gvp + bh * L * D;
      for (size_t e = 0; e < terms.size(); ++e)
        if (terms[e].kind == kColCtx) std::fill(scratch.b[e].begin(), scratch.b[e].end(), T(0));
      for (int64_t r0 = 0; r0 < L; r0 += rows) {
        const int64_t n = std::min(rows, L - r0);
        const T *q_blk = qh + r0 * D, *go_blk = goh + r0 * D;
        T* gq_blk = gqp + (bh * L + r0) * D;
        block_logits(p, qh, kh, r0, n, sh, scale, terms, scratch, pad, b, h);
        for (size_t e = 0; e < terms.size(); ++e)
          if (terms[e].kind == kValue || terms[e].kind == kRowCtx)
            std::fill(scratch.b[e].begin(), scratch.b[e].end(), T(0));
        for (int64_t t = 0; t < n; ++t) {
          const int64_t i = r0 + t;
          T* row = p + t * L;
          exp_row(row, L, lp[bh * L + i], pad.keep_row(b, L));  // probabilities
          T dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += goh[i * D + d] * oh[i * D + d];
          delta[t] = dot;  // sum_j p_ij d p_ij = dO_i . O_i, with or without dropout
          T* weights = row;  // after dropout: into dp, which is free until dP below
          if (drop.on()) {
            T* m = keep + t * L;
            dropout_multipliers(m, L, drop, bh * L + i);
            weights = dp + t * L;
#pragma omp simd
            for (int64_t j = 0; j < L; ++j) weights[j] = row[j] * m[j];
          }
          for (size_t e = 0; e < terms.size(); ++e)
            if (terms[e].kind == kValue)  // the weight of each bucket
              term_sums(weights, terms[e], i, L, scratch.work.data(), scratch.b[e].data() + t * terms[e].nb);
        }
        for (size_t e = 0; e < terms.size(); ++e) {
          const auto& term = terms[e];
          if (term.kind != kValue) continue;
          // d r = mass^T dO;  d p_ij += dO_i . r[b(i, j)] = (dO r^T)[i, b(i, j)]
          gemm(true, false, term.nb, D, n, T(1), scratch.b[e].data(), term.nb, go_blk, D, T(1),
               term.grad + bh * term.nb * D, D);
          gemm(false, true, n, term.nb, D, T(1), go_blk, D, term.head(h), D, T(0), scratch.a[e].data(), term.nb);
          std::fill(scratch.b[e].begin(), scratch.b[e].end(), T(0));
        }
        gemm(true, false, L, D, n, T(1), drop.on() ? dp : p, L, go_blk, D, T(1), gvh, D);  // dV += P^T dO
        bool gathered = false;
        for (int64_t t = 0; t < n; ++t) {
          bool add = false;
          for (size_t e = 0; e < terms.size(); ++e)
            if (terms[e].kind == kValue) {
              term_gather(dp + t * L, add, scratch.a[e].data() + t * terms[e].nb, terms[e], r0 + t, L,
                          scratch.values.data(), scratch.work.data());
              add = true;
            }
          gathered = add;
        }
        gemm(false, true, n, L, D, T(1), go_blk, D, vh, D, gathered ? T(1) : T(0), dp, L);  // dP (+)= dO V^T
        for (int64_t t = 0; t < n; ++t) {
          const int64_t i = r0 + t;
          T* drow = dp + t * L;
          const T* prow = p + t * L;
          const T dl = delta[t];
          if (drop.on()) {  // dP of the weights before dropout
            const T* m = keep + t * L;
#pragma omp simd
            for (int64_t j = 0; j < L; ++j) drow[j] = prow[j] * (drow[j] * m[j] - dl);  // d logits
          } else {
#pragma omp simd
            for (int64_t j = 0; j < L; ++j) drow[j] = prow[j] * (drow[j] - dl);
          }
          for (size_t e = 0; e < terms.size(); ++e) {
            const auto& term = terms[e];
            if (term.kind == kBias) {
              term_sums(drow, term, i, L, scratch.work.data(), term.grad + bh * term.nb);
            } else if (term.kind == kRowCtx) {
              term_sums(drow, term, i, L, scratch.work.data(), scratch.b[e].data() + t * term.nb);
            } else if (term.kind == kColCtx) {  // distinct keys j: distinct rows of the gradient
              T* g = scratch.b[e].data();
              const bucket_t* id = term.ids + i * L;
              const int64_t nb = term.nb;
#pragma omp simd
              for (int64_t j = 0; j < L; ++j) g[j * nb + id[j]] += drow[j];
            }
          }
        }
        gemm(false, false, n, D, L, scale, dp, L, kh, D, T(0), gq_blk, D);  // dQ = s dS K
        gemm(true, false, L, D, n, scale, dp, L, q_blk, D, T(1), gkh, D);  // dK += s dS^T Q
        for (size_t e = 0; e < terms.size(); ++e) {
          const auto& term = terms[e];
          if (term.kind != kRowCtx) continue;  // projections p = s Q r: dQ += s dp r^T, dr += s Q^T dp
          gemm(false, true, n, D, term.nb, scale, scratch.b[e].data(), term.nb, term.head(h), term.nb, T(1),
               gq_blk, D);
          gemm(true, false, D, term.nb, n, scale, q_blk, D, scratch.b[e].data(), term.nb, T(1),
               term.grad + bh * D * term.nb, term.nb);
        }
      }
      for (size_t e = 0; e < terms.size(); ++e) {
        const auto& term = terms[e];
        if (term.kind != kColCtx) continue;  // projections p = s K r: dK += s dp r^T, dr = s K^T dp
        gemm(false, true, L, D, term.nb, scale, scratch.b[e].data(), term.nb, term.head(h), term.nb, T(1), gkh, D);
        gemm(true, false, D, term.nb, L, scale, kh, D, scratch.b[e].data(), term.nb, T(0),
             term.grad + bh * D * term.nb, term.nb);
      }
    }
  });
  std::vector<Tensor> result{gq, gk, gv};
  result.insert(result.end(), grads.begin(), grads.end());
  return result;
}

Dropout make_dropout(double p, int64_t seed) {
  TORCH_CHECK(p >= 0 && p < 1, "dropout must be in [0, 1), got ", p);
  return Dropout{p, static_cast<uint64_t>(seed)};
}

// Python entry points; specs: one TermSpec per iRPE term; rows: query rows per block; dropout
// and seed: the probability of dropping an attention weight and the masks' seed (the same in
// forward and backward).
std::vector<Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, const Tensor& pad_mask,
                            const std::vector<TermSpec>& specs, int64_t rows, double dropout, int64_t seed) {
  TORCH_CHECK(rows > 0, "rows must be positive");
  const Dropout drop = make_dropout(dropout, seed);
  if (q.scalar_type() == at::kFloat) return forward_impl<float>(q, k, v, scale, pad_mask, specs, rows, drop);
  TORCH_CHECK(q.scalar_type() == at::kDouble, "float32 or float64 only");
  return forward_impl<double>(q, k, v, scale, pad_mask, specs, rows, drop);
}

std::vector<Tensor> backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                             const Tensor& grad_out, double scale, const Tensor& pad_mask,
                             const std::vector<TermSpec>& specs, int64_t rows, double dropout, int64_t seed) {
  TORCH_CHECK(rows > 0, "rows must be positive");
  const Dropout drop = make_dropout(dropout, seed);
  if (q.scalar_type() == at::kFloat)
    return backward_impl<float>(q, k, v, out, lse, grad_out, scale, pad_mask, specs, rows, drop);
  TORCH_CHECK(q.scalar_type() == at::kDouble, "float32 or float64 only");
  return backward_impl<double>(q, k, v, out, lse, grad_out, scale, pad_mask, specs, rows, drop);
}

// The multipliers (0 or 1 / (1 - dropout)) that the kernel applies to the attention weights of
// query rows 0 : rows (row (b * H + h) * L + i), for tests: (rows, L) float64.
Tensor dropout_mask(double dropout, int64_t seed, int64_t rows, int64_t L) {
  const Dropout drop = make_dropout(dropout, seed);
  Tensor mask = at::empty({rows, L}, at::kDouble);
  for (int64_t r = 0; r < rows; ++r) dropout_multipliers(mask.data_ptr<double>() + r * L, L, drop, r);
  return mask;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused iRPE attention forward: (out (B, H, L, D), lse (B, H, L))");
  m.def("backward", &backward, "fused iRPE attention backward: dq, dk, dv, then one gradient per term");
  m.def("dropout_mask", &dropout_mask, "the kernel's dropout multipliers of query rows 0 : rows, (rows, L)");
}
