// Shared by every attention kernel (`attn_decode.cu`, `attn_general.cu`, `attn_prefill.cu`,
// `attn_prefill_sm90.cu`), which all take their sizes and layouts as one parameter block:
// the mask encoding and `ff_attn_params`, whose C layout matches `AttnParams` in
// `cuda/sdpa/mod.rs`.
#pragma once
#include "ferrofast_prelude.cuh"

// Mask kinds (`mask_kind`; the `MASK` template argument of `attn_prefill.cu` uses the same
// numbers).
#define FF_MASK_NONE 0
#define FF_MASK_BOOL 1
#define FF_MASK_ADD 2

// Scalar parameters, passed by value.
struct ff_attn_params {
    // Element offsets and strides (batch, head, position, feature) of q, k, v.
    ff_i64_t q_off, q_sb, q_sh, q_st, q_sd;
    ff_i64_t k_off, k_sb, k_sh, k_st, k_sd;
    ff_i64_t v_off, v_sb, v_sh, v_st, v_sd;
    // The mask broadcast to [B, N_q, T_q, T_kv]: offset and four strides.
    ff_i64_t m_off, m_sb, m_sh, m_st, m_sk;
    // The sinks: offset and stride.
    ff_i64_t s_off, s_stride;
    int mask_kind;
    int causal;
    int has_sinks;
    int n_kv;          // kv heads
    int group;         // query heads per kv head
    int t_q;
    int t_kv;
    int d;
    int d_v;
    int n_row_chunks;  // blocks per (batch, kv head) along the rows of the GQA group
    int n_dv_chunks;   // blocks along the output features (general; 1 for decode)
    int n_splits;      // key ranges (decode; 1 for general)
    int split_len;     // keys per range (decode; T_kv for general)
    float scale_log2;  // scale * log2(e)
};
