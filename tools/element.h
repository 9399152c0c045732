// The semantic value of every element of a bench pool, as one pure function
// of where the element lies: element d of the row (layer, k/v, kv head,
// token) is FromSeed(RowSeed(layer, kv, head, token), d), and a pool stores
// its low elem_bytes bytes, little-endian (tools/rank_harness.h).
//
// The functions live in a header of their own so that the host fill and
// check (rank_harness.cc) and the GPU ones (device_rows.cu) compute the same
// bytes from one definition: under nvcc they are __host__ __device__. The
// header is C++17 (nvcc builds the .cu files as C++17) and needs nothing
// from the CUDA toolkit.
//
// The values are part of what the bench checks across processes and
// machines: changing any constant here changes every expected byte.
//
// Thread safety: pure functions.
#ifndef KVBOUNCE_TOOLS_ELEMENT_H_
#define KVBOUNCE_TOOLS_ELEMENT_H_

#include <cstdint>

// Marks a function callable from host and device code when nvcc compiles
// the file; plain C++ otherwise.
#if defined(__CUDACC__)
#define KVB_HOST_DEVICE __host__ __device__
#else
#define KVB_HOST_DEVICE
#endif

namespace kvbounce::tools {

// The odd constant FromSeed steps by: element d + 1 of a row is element d
// plus this (mod 2^64), so a kernel walking a row needs one multiply only.
inline constexpr uint64_t kElementStep = 0xd1342543de82ef95ULL;

// SplitMix64's finalizer: a bijection on 64-bit values that spreads every
// input bit over the output.
KVB_HOST_DEVICE constexpr uint64_t Mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// The seed of row (layer, kv, head, token), all global indices: each field
// has its own bits before mixing, so distinct rows of any real shape get
// distinct, unrelated seeds.
KVB_HOST_DEVICE constexpr uint64_t RowSeed(int layer, int kv, int head, int64_t token) {
  return Mix((static_cast<uint64_t>(layer) << 48) ^ (static_cast<uint64_t>(kv) << 44) ^
             (static_cast<uint64_t>(head) << 32) ^ static_cast<uint64_t>(token));
}

// The seed of row (layer, kv, head, token) in the pools of ctx instance
// `instance` of an in-process cluster (tools/cluster.h) that runs several:
// instance 0 holds RowSeed itself (what every single-instance run, process
// and machine checks), instance i > 0 RowSeed with a salt of its own, so a
// gen pool that received a request from another instance than the one
// verification expects holds wrong bytes. XOR with a constant keeps the
// rows of one instance distinct.
KVB_HOST_DEVICE constexpr uint64_t InstanceRowSeed(int instance, int layer, int kv, int head,
                                                   int64_t token) {
  const uint64_t seed = RowSeed(layer, kv, head, token);
  return instance == 0 ? seed : seed ^ Mix(0x696e7374616e6365ULL + static_cast<uint64_t>(instance));
}

// Hybrid models: the seed of unit `unit` (global) of state segment
// `segment` (every tensor's segments in turn, flattened) of recurrent layer
// `layer` (its ordinal among the model's recurrent layers), in ctx instance
// `instance`'s pools; element e of the unit is FromSeed(seed, e). A domain
// constant of its own keeps these apart from every KV row seed.
KVB_HOST_DEVICE constexpr uint64_t StateUnitSeed(int instance, int layer, int segment, int unit) {
  const uint64_t seed = Mix(0x7374617465000000ULL ^ (static_cast<uint64_t>(layer) << 40) ^
                            (static_cast<uint64_t>(segment) << 32) ^ static_cast<uint64_t>(unit));
  return instance == 0 ? seed : seed ^ Mix(0x696e7374616e6365ULL + static_cast<uint64_t>(instance));
}

// Element d of a row from the row's seed (cheap, and distinct per element).
KVB_HOST_DEVICE constexpr uint64_t FromSeed(uint64_t seed, int d) {
  return seed + static_cast<uint64_t>(d) * kElementStep;
}

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_ELEMENT_H_
