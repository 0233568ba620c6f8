// Block hashes of the prefix cache: XXH64 of the chained block contents.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace psnrl_blocks {

// XXH64 (https://github.com/Cyan4973/xxHash, spec xxhash_spec.md), written out
// here so the module has no dependency. Reads are little-endian: the module is
// built only for little-endian hosts (checked below).
constexpr uint64_t kP1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t kP2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t kP3 = 0x165667B19E3779F9ULL;
constexpr uint64_t kP4 = 0x85EBCA77C2B2AE63ULL;
constexpr uint64_t kP5 = 0x27D4EB2F165667C5ULL;

inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t read64(const unsigned char* p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
}
inline uint32_t read32(const unsigned char* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}
inline uint64_t xxh_round(uint64_t acc, uint64_t input) {
    acc += input * kP2;
    acc = rotl64(acc, 31);
    return acc * kP1;
}
inline uint64_t xxh_merge(uint64_t acc, uint64_t val) {
    acc ^= xxh_round(0, val);
    return acc * kP1 + kP4;
}

uint64_t xxh64(const void* data, size_t len, uint64_t seed = 0) {
    const auto* p = static_cast<const unsigned char*>(data);
    const unsigned char* end = p + len;
    uint64_t h;
    if (len >= 32) {
        uint64_t v1 = seed + kP1 + kP2, v2 = seed + kP2, v3 = seed, v4 = seed - kP1;
        const unsigned char* limit = end - 32;
        do {
            v1 = xxh_round(v1, read64(p));
            v2 = xxh_round(v2, read64(p + 8));
            v3 = xxh_round(v3, read64(p + 16));
            v4 = xxh_round(v4, read64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xxh_merge(h, v1);
        h = xxh_merge(h, v2);
        h = xxh_merge(h, v3);
        h = xxh_merge(h, v4);
    } else {
        h = seed + kP5;
    }
    h += static_cast<uint64_t>(len);
    while (p + 8 <= end) {
        h ^= xxh_round(0, read64(p));
        h = rotl64(h, 27) * kP1 + kP4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= static_cast<uint64_t>(read32(p)) * kP1;
        h = rotl64(h, 23) * kP2 + kP3;
        p += 4;
    }
    while (p < end) {
        h ^= static_cast<uint64_t>(*p) * kP5;
        h = rotl64(h, 11) * kP1;
        ++p;
    }
    h ^= h >> 33;
    h *= kP2;
    h ^= h >> 29;
    h *= kP3;
    h ^= h >> 32;
    return h;
}

bool host_is_little_endian() {
    const uint32_t one = 1;
    unsigned char b;
    std::memcpy(&b, &one, 1);
    return b == 1;
}

// Hash of one block: XXH64 over [le64(parent)] + le64(token) * n. An unsalted
// root block (no parent) hashes 8 bytes fewer, so it can never alias a block
// that has a parent. `parent` is the parent block's hash, or for the root block
// of a salted sequence the salt (which the block then records as a salt link).
uint64_t hash_tokens(const std::optional<uint64_t>& parent, const int64_t* tokens, size_t n,
                     std::vector<uint64_t>& scratch) {
    scratch.clear();
    if (parent) scratch.push_back(*parent);
    for (size_t i = 0; i < n; ++i) scratch.push_back(static_cast<uint64_t>(tokens[i]));
    return xxh64(scratch.data(), scratch.size() * sizeof(uint64_t));
}

}  // namespace psnrl_blocks
