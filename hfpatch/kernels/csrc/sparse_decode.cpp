// Sparse decode attention on the CPU (float32), two entry points:
// - sparse_decode_attention: exact attention of one query step over an index set of the cache (reference:
//   hfpatch/kernels/sparse_decode.py);
// - lowrank_sparse_decode: per-step re-selection in a low-rank key basis followed by that attention
//   (reference: hfpatch/kernels/lowrank_decode.py).
// Read the references' docstrings for the semantics. Why compiled: on a 2-core CPU the same steps written
// as torch ops (gathers, masks, a softmax, ~30 ops for the re-selection) cost more in dispatch and in
// passes over memory than in arithmetic.
//
// lowrank_sparse_decode:
// Step 1 is split over (batch row, KV head, chunk of positions), the rest over (batch row, KV head):
//   1. the group's queries go into the basis (scaled) and score every cached position from the projected
//      key cache, blocked along positions so a block of projected keys is read from memory once;
//   2. softmax per query head, summed over the group = the selection score of a position;
//   3. the `budget` best positions (sinks and recent window forced in, padding never) are found by a radix
//      select on the scores' bit patterns (scores are >= 0, so bit order = value order) and emitted in
//      ascending order;
//   4. exact softmax attention of the group's queries over the selected rows of the key/value cache, rows
//      prefetched a few ahead (the selected rows are scattered: latency, not bandwidth, bounds this part).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr uint32_t kForced = 0xFFFFFFFFu;  // selection key of sinks / window: above every score
constexpr int64_t kBlock = 1024;            // positions per block of the low-rank scoring pass
constexpr int64_t kAhead = 12;              // rows prefetched ahead in the attention pass

// The k-th largest of keys[0..n) (k >= 1, k <= n) and how many keys equal to it are to be taken.
std::pair<uint32_t, int64_t> kth_largest(const uint32_t* keys, int64_t n, int64_t k, uint32_t* scratch) {
  int64_t hist[2048];
  std::fill(hist, hist + 2048, 0);
  for (int64_t i = 0; i < n; ++i) ++hist[keys[i] >> 21];
  int64_t need = k, top = 2047;
  for (; top > 0 && hist[top] < need; --top) need -= hist[top];
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i)
    if ((keys[i] >> 21) == uint32_t(top)) scratch[m++] = keys[i];
  uint32_t value = uint32_t(top) << 21;
  // the two lower digits (11 and 10 bits) over the keys of the chosen top bucket only
  const int shift[2] = {10, 0};
  const int width[2] = {11, 10};
  for (int pass = 0; pass < 2; ++pass) {
    const int above = shift[pass] + width[pass];
    const uint32_t buckets = 1u << width[pass];
    std::fill(hist, hist + buckets, 0);
    for (int64_t i = 0; i < m; ++i)
      if ((scratch[i] >> above) == (value >> above)) ++hist[(scratch[i] >> shift[pass]) & (buckets - 1)];
    int64_t b = buckets - 1;
    for (; b > 0 && hist[b] < need; --b) need -= hist[b];
    value |= uint32_t(b) << shift[pass];
  }
  return {value, need};
}

// Exact softmax attention of a group's G queries (q: [G, D]) over the n cache rows listed in rows (each
// valid, in [0, S)); out [G, Dv] is overwritten. probs: scratch of G * n floats. Rows are prefetched a few
// ahead, the value rows too, so the second pass finds them in cache (the rows are scattered: latency, not
// bandwidth, bounds this part).
void attend_rows(const float* q, const float* kb, int64_t ks, const float* vb, int64_t vs, const int64_t* rows,
                 int64_t n, int64_t G, int64_t D, int64_t Dv, float scale, float* probs, float* out) {
  std::fill(out, out + G * Dv, 0.f);
  if (n == 0) return;
  for (int64_t i = 0; i < std::min(n, kAhead); ++i)
    for (int64_t c = 0; c < D; c += 16) __builtin_prefetch(kb + rows[i] * ks + c);
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) {
      for (int64_t c = 0; c < D; c += 16) __builtin_prefetch(kb + rows[i + kAhead] * ks + c);
      for (int64_t c = 0; c < Dv; c += 16) __builtin_prefetch(vb + rows[i + kAhead] * vs + c);
    }
    const float* krow = kb + rows[i] * ks;
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc += q[g * D + d] * krow[d];
      probs[g * n + i] = acc * scale;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* pr = probs + g * n;
    float top = -3.0e38f;
    for (int64_t i = 0; i < n; ++i) top = std::max(top, pr[i]);
    float total = 0.f;
    for (int64_t i = 0; i < n; ++i) { pr[i] = std::exp(pr[i] - top); total += pr[i]; }
    const float inv = 1.f / total;
    for (int64_t i = 0; i < n; ++i) pr[i] *= inv;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float* vrow = vb + rows[i] * vs;
    for (int64_t g = 0; g < G; ++g) {
      const float weight = probs[g * n + i];
      for (int64_t d = 0; d < Dv; ++d) out[g * Dv + d] += weight * vrow[d];
    }
  }
}

void check_float32(std::initializer_list<const torch::Tensor*> tensors, const char* op) {
  for (const torch::Tensor* t : tensors)
    TORCH_CHECK(t->scalar_type() == torch::kFloat, op, " (CPU): float32 tensors only");
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> lowrank_sparse_decode(
    const torch::Tensor& query, const torch::Tensor& basis, const torch::Tensor& projected,
    const torch::Tensor& key, const torch::Tensor& value, const c10::optional<torch::Tensor>& valid_opt,
    double scale, int64_t budget, int64_t sink, int64_t window, int64_t fresh) {
  check_float32({&query, &basis, &projected, &key, &value}, "lowrank_sparse_decode");
  TORCH_CHECK(query.is_contiguous() && basis.is_contiguous(), "query and basis must be contiguous");
  TORCH_CHECK(projected.stride(3) == 1 && key.stride(3) == 1 && value.stride(3) == 1,
              "projected keys, keys and values need a unit stride in their last dimension");
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(2);
  const int64_t Hkv = key.size(1), S = key.size(2), Dv = value.size(3), R = basis.size(3);
  const int64_t G = Hq / Hkv;
  const int64_t K = std::min<int64_t>(budget, S);
  const int64_t win = std::max<int64_t>(window, 1);
  TORCH_CHECK(projected.size(2) == R && projected.size(3) == S, "projected keys must be [B, Hkv, rank, S]");
  const bool* valid_all = nullptr;
  torch::Tensor valid;
  if (valid_opt.has_value()) {
    valid = valid_opt->to(torch::kBool).contiguous();
    TORCH_CHECK(valid.size(0) == B && valid.size(1) == S, "valid must be [B, S]");
    valid_all = valid.data_ptr<bool>();
  }
  auto out = torch::zeros({B, Hq, Dv}, query.options());
  auto index = torch::full({B, Hkv, K}, -1, query.options().dtype(torch::kLong));
  const float* q_all = query.data_ptr<float>();
  const float* w_all = basis.data_ptr<float>();
  float* p_all = projected.data_ptr<float>();
  const float* k_all = key.data_ptr<float>();
  const float* v_all = value.data_ptr<float>();
  float* o_all = out.data_ptr<float>();
  int64_t* ix_all = index.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);
  TORCH_CHECK(fresh >= 0 && fresh <= S, "fresh must be in [0, S]");

  // 0. project the keys added since the previous step (the last `fresh` positions) into the buffer
  for (int64_t bh = 0; bh < B * Hkv; ++bh) {
    const int64_t b = bh / Hkv, h = bh % Hkv;
    const float* w = w_all + bh * D * R;
    float* p = p_all + b * projected.stride(0) + h * projected.stride(1);
    for (int64_t s = S - fresh; s < S; ++s) {
      const float* krow = k_all + b * key.stride(0) + h * key.stride(1) + s * key.stride(2);
      for (int64_t r = 0; r < R; ++r) {
        float acc = 0.f;
        for (int64_t d = 0; d < D; ++d) acc += krow[d] * w[d * R + r];
        p[r * projected.stride(2) + s] = acc;
      }
    }
  }

  // 1. scaled projected queries and approximate logits, the memory-bound part: split along positions as
  //    well, so that every thread streams an equal share of the projected keys (a few KV heads alone would
  //    leave threads idle, e.g. 3 heads on 2 threads)
  auto logits_all = torch::empty({B * Hkv, G, S}, query.options());
  float* l_all = logits_all.data_ptr<float>();
  const int64_t heads = B * Hkv;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((2 * at::get_num_threads() + heads - 1) / heads,
                                                                 (S + kBlock - 1) / kBlock));
  const int64_t chunk_len = (S + chunks - 1) / chunks;
  at::parallel_for(0, heads * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> pq(G * R);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / chunks, b = bh / Hkv, h = bh % Hkv;
      const int64_t first = (task % chunks) * chunk_len, last = std::min(S, first + chunk_len);
      const float* q = q_all + (b * Hq + h * G) * D;
      const float* w = w_all + bh * D * R;
      const float* p = p_all + b * projected.stride(0) + h * projected.stride(1);
      for (int64_t g = 0; g < G; ++g) {
        float* pqg = pq.data() + g * R;
        std::fill(pqg, pqg + R, 0.f);
        for (int64_t d = 0; d < D; ++d)
          for (int64_t r = 0; r < R; ++r) pqg[r] += q[g * D + d] * w[d * R + r];
        for (int64_t r = 0; r < R; ++r) pqg[r] *= fscale;
      }
      for (int64_t s0 = first; s0 < last; s0 += kBlock) {  // a block of projected keys is read once
        const int64_t s1 = std::min(last, s0 + kBlock);
        for (int64_t g = 0; g < G; ++g) {
          float* row = l_all + (bh * G + g) * S;
          std::fill(row + s0, row + s1, 0.f);
          for (int64_t r = 0; r < R; ++r) {
            const float c = pq[g * R + r];
            const float* pr = p + r * projected.stride(2);
            for (int64_t s = s0; s < s1; ++s) row[s] += c * pr[s];
          }
        }
      }
    }
  });

  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(S), probs(G * std::max<int64_t>(K, 1));
    std::vector<uint32_t> keys(S), scratch(S);
    std::vector<int64_t> sel(std::max<int64_t>(K, 1));
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      const bool* valid_row = valid_all ? valid_all + b * S : nullptr;
      const float* q = q_all + (b * Hq + h * G) * D;  // the group's G queries, [G, D]
      float* logits = l_all + bh * G * S;

      // 2. softmax per query head (padding excluded), summed over the group
      std::fill(score.begin(), score.end(), 0.f);
      for (int64_t g = 0; g < G; ++g) {
        float* row = logits + g * S;
        float top = -3.0e38f;
        for (int64_t s = 0; s < S; ++s)
          if (!valid_row || valid_row[s]) top = std::max(top, row[s]);
        for (int64_t s = 0; s < S; ++s) row[s] = std::exp(row[s] - top);
        if (valid_row)
          for (int64_t s = 0; s < S; ++s)
            if (!valid_row[s]) row[s] = 0.f;
        float total = 0.f;
        for (int64_t s = 0; s < S; ++s) total += row[s];
        const float inv = total > 0.f ? 1.f / total : 0.f;
        for (int64_t s = 0; s < S; ++s) score[s] += row[s] * inv;
      }
      // 3. selection keys (padding 0, forced positions above all, else score bits + 1) and top K
      for (int64_t s = 0; s < S; ++s) {
        uint32_t u;
        std::memcpy(&u, &score[s], sizeof(u));
        keys[s] = (valid_row && !valid_row[s]) ? 0u : u + 1u;
      }
      for (int64_t s = 0, seen = 0; s < S && seen < sink; ++s)
        if (keys[s]) { keys[s] = kForced; ++seen; }
      for (int64_t s = std::max<int64_t>(0, S - win); s < S; ++s)
        if (keys[s]) keys[s] = kForced;
      int64_t n = 0;
      if (K > 0) {
        auto [threshold, ties] = kth_largest(keys.data(), S, K, scratch.data());
        if (threshold == 0) ties = 0;  // fewer attendable positions than K: never take padding
        for (int64_t s = 0; s < S && n < K; ++s) {
          const uint32_t u = keys[s];
          if (u > threshold) sel[n++] = s;
          else if (u == threshold && ties > 0) { sel[n++] = s; --ties; }
        }
      }
      std::copy(sel.begin(), sel.begin() + n, ix_all + bh * K);

      // 4. exact attention over the selected rows
      attend_rows(q, k_all + b * key.stride(0) + h * key.stride(1), key.stride(2),
                  v_all + b * value.stride(0) + h * value.stride(1), value.stride(2), sel.data(), n, G, D, Dv,
                  fscale, probs.data(), o_all + (b * Hq + h * G) * Dv);
    }
  });
  return {out, index};
}

torch::Tensor sparse_decode_attention(const torch::Tensor& query, const torch::Tensor& key,
                                      const torch::Tensor& value, const torch::Tensor& index,
                                      const c10::optional<torch::Tensor>& valid_opt, double scale) {
  check_float32({&query, &key, &value}, "sparse_decode_attention");
  TORCH_CHECK(query.is_contiguous() && key.stride(3) == 1 && value.stride(3) == 1,
              "query must be contiguous, keys and values need a unit stride in their last dimension");
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(2);
  const int64_t Hkv = key.size(1), S = key.size(2), Dv = value.size(3), N = index.size(2);
  const int64_t G = Hq / Hkv;
  TORCH_CHECK(index.size(0) == B && index.size(1) == Hkv, "index must be [B, Hkv, N]");
  const torch::Tensor idx = index.to(torch::kLong).contiguous();
  torch::Tensor valid;
  const bool* valid_all = nullptr;
  if (valid_opt.has_value()) {
    valid = valid_opt->to(torch::kBool).contiguous();
    valid_all = valid.data_ptr<bool>();
  }
  auto out = torch::empty({B, Hq, Dv}, query.options());
  const float* q_all = query.data_ptr<float>();
  const float* k_all = key.data_ptr<float>();
  const float* v_all = value.data_ptr<float>();
  const int64_t* i_all = idx.data_ptr<int64_t>();
  float* o_all = out.data_ptr<float>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rows(std::max<int64_t>(N, 1));
    std::vector<float> probs(G * std::max<int64_t>(N, 1));
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      const bool* valid_row = valid_all ? valid_all + b * S : nullptr;
      int64_t n = 0;
      for (int64_t i = 0; i < N; ++i) {  // out-of-range entries (e.g. -1 padding) and padding are skipped
        const int64_t pos = i_all[bh * N + i];
        if (pos >= 0 && pos < S && (!valid_row || valid_row[pos])) rows[n++] = pos;
      }
      attend_rows(q_all + (b * Hq + h * G) * D, k_all + b * key.stride(0) + h * key.stride(1), key.stride(2),
                  v_all + b * value.stride(0) + h * value.stride(1), value.stride(2), rows.data(), n, G, D, Dv,
                  static_cast<float>(scale), probs.data(), o_all + (b * Hq + h * G) * Dv);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lowrank_sparse_decode", &lowrank_sparse_decode,
        "low-rank re-selection + exact sparse decode attention (float32, CPU)");
  m.def("sparse_decode_attention", &sparse_decode_attention,
        "exact decode attention over an index set of the cache (float32, CPU)");
}
