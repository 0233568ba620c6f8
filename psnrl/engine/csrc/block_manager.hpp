// KV-cache block manager with hash-based prefix caching, reference counts and copy-on-write;
// its model (block tables, the prefix cache and its salts, the computed horizon, the free pool,
// staleness) is described in README.md beside this file.
#pragma once

#include <pybind11/pybind11.h>  // stats() returns a Python dict

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "block_hash.hpp"

namespace psnrl_blocks {

namespace py = pybind11;

// ------------------------------------------------------------- exceptions --

struct OutOfBlocksError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
struct UnknownSequenceError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------- manager --

struct AppendResult {
    int64_t slot = 0;
    int32_t block_id = 0;
    bool new_block = false;  // a block was taken from the free pool (new or CoW)
    std::optional<std::pair<int32_t, int32_t>> cow;  // (src, dst) rows to copy
};

class BlockManager {
   public:
    BlockManager(int64_t num_blocks, int64_t block_size, double watermark)
        : num_blocks_(0), block_size_(0), watermark_(watermark) {
        if (num_blocks < 1 || num_blocks > INT32_MAX)
            throw std::invalid_argument("num_blocks must be in [1, 2**31 - 1], got " +
                                        std::to_string(num_blocks));
        if (block_size < 1 || block_size > (1 << 20))
            throw std::invalid_argument("block_size must be in [1, 2**20], got " +
                                        std::to_string(block_size));
        if (!(watermark >= 0.0 && watermark < 1.0))
            throw std::invalid_argument("watermark must be in [0, 1), got " +
                                        std::to_string(watermark));
        num_blocks_ = static_cast<int32_t>(num_blocks);
        block_size_ = static_cast<int32_t>(block_size);
        watermark_blocks_ = static_cast<int64_t>(watermark * static_cast<double>(num_blocks));
        blocks_.resize(num_blocks_);
        reset();
    }

    // ---- queries
    int32_t num_blocks() const { return num_blocks_; }
    int32_t block_size() const { return block_size_; }
    double watermark() const { return watermark_; }
    int64_t watermark_blocks() const { return watermark_blocks_; }
    int64_t num_free_blocks() const { return free_count_; }
    int64_t num_cached_blocks() const { return static_cast<int64_t>(hash_to_block_.size()); }
    int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }
    bool has_sequence(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }

    int64_t blocks_for(int64_t num_tokens) const {
        return (num_tokens + block_size_ - 1) / block_size_;
    }

    bool can_allocate(int64_t num_tokens) const {
        if (num_tokens < 1)
            throw std::invalid_argument("num_tokens must be >= 1, got " + std::to_string(num_tokens));
        return free_count_ - blocks_for(num_tokens) >= watermark_blocks_;
    }

    // Exact number of free-pool blocks allocate(token_ids) would take now
    // (fresh blocks + cache hits on free blocks); no watermark.
    int64_t num_required_blocks(const std::vector<int64_t>& tokens,
                                std::optional<uint64_t> salt) {
        if (tokens.empty()) throw std::invalid_argument("token_ids must be non-empty");
        Plan plan = make_plan(tokens, salt);
        return plan.required;
    }

    int64_t allocate(int64_t seq_id, const std::vector<int64_t>& tokens,
                     std::optional<int64_t> num_scheduled, std::optional<uint64_t> salt) {
        if (seqs_.count(seq_id))
            throw std::invalid_argument("sequence " + std::to_string(seq_id) + " is already allocated");
        if (tokens.empty()) throw std::invalid_argument("token_ids must be non-empty");
        const int64_t n = static_cast<int64_t>(tokens.size());
        const int64_t scheduled = num_scheduled ? *num_scheduled : n;
        if (scheduled < 0 || scheduled > n)
            throw std::invalid_argument("num_scheduled must be in [0, len(token_ids)], got " +
                                        std::to_string(scheduled));
        Plan plan = make_plan(tokens, salt);
        if (plan.required > free_count_) {
            std::ostringstream os;
            os << "allocate(" << seq_id << "): needs " << plan.required << " free blocks ("
               << plan.hits.size() << " of " << plan.num_blocks << " blocks are prefix-cache hits), "
               << free_count_ << " free";
            throw OutOfBlocksError(os.str());
        }
        // Commit (nothing below can fail). Take the hits first so that popping
        // fresh blocks cannot evict them.
        Sequence seq;
        seq.tokens = tokens;
        seq.salt = salt;
        seq.table.reserve(plan.num_blocks);
        for (int32_t b : plan.hits) {
            Block& blk = blocks_[b];
            if (blk.ref == 0) unlink_free(b);
            ++blk.ref;
            seq.table.push_back(b);
        }
        const int64_t nfull = static_cast<int64_t>(tokens.size()) / block_size_;
        for (int64_t i = static_cast<int64_t>(plan.hits.size()); i < plan.num_blocks; ++i) {
            int32_t b = pop_free();
            blocks_[b].ref = 1;
            if (i < nfull) {
                if (i > 0)
                    set_full(b, plan.hashes[i], plan.hashes[i - 1], false, tokens.data() + i * block_size_);
                else
                    set_full(b, plan.hashes[0], salt, salt.has_value(), tokens.data());
            }
            seq.table.push_back(b);
        }
        const int64_t cached = static_cast<int64_t>(plan.hits.size()) * block_size_;
        advance_computed(seq, std::max(cached, scheduled));
        stat_queries_ += static_cast<int64_t>(tokens.size());
        stat_hits_ += cached;
        seqs_.emplace(seq_id, std::move(seq));
        return cached;
    }

    void mark_computed(int64_t seq_id, int64_t num_tokens) {
        Sequence& seq = get(seq_id);
        if (num_tokens < 0 || num_tokens > static_cast<int64_t>(seq.tokens.size()))
            throw std::invalid_argument("mark_computed: num_tokens must be in [0, " +
                                        std::to_string(seq.tokens.size()) + "], got " +
                                        std::to_string(num_tokens));
        advance_computed(seq, num_tokens);
    }
    int64_t num_computed(int64_t seq_id) const { return get(seq_id).computed; }

    bool can_append(int64_t seq_id) const {
        const Sequence& seq = get(seq_id);
        return free_count_ >= append_need(seq);
    }

    AppendResult append_token(int64_t seq_id, int64_t token) {
        Sequence& seq = get(seq_id);
        const int64_t len = static_cast<int64_t>(seq.tokens.size());
        const int32_t off = static_cast<int32_t>(len % block_size_);
        if (append_need(seq) > free_count_) {
            std::ostringstream os;
            os << "append_token(" << seq_id << "): needs a free block ("
               << (off == 0 ? "last block is full" : "copy-on-write of a shared block")
               << "), none free";
            throw OutOfBlocksError(os.str());
        }
        AppendResult res;
        if (off == 0) {
            int32_t b = pop_free();
            blocks_[b].ref = 1;
            seq.table.push_back(b);
            res.new_block = true;
        } else {
            int32_t src = seq.table.back();
            if (blocks_[src].ref > 1) {
                int32_t dst = pop_free();
                blocks_[dst].ref = 1;
                blocks_[dst].stale = blocks_[src].stale;
                --blocks_[src].ref;
                seq.table.back() = dst;
                seq.device_len = std::min(seq.device_len, static_cast<int64_t>(seq.table.size()) - 1);
                res.new_block = true;
                res.cow = std::make_pair(src, dst);
                ++stat_cow_;
            }
        }
        seq.tokens.push_back(token);
        const int32_t b = seq.table.back();
        res.block_id = b;
        res.slot = static_cast<int64_t>(b) * block_size_ + off;
        if (off == block_size_ - 1) seal_last_block(seq);  // the block just became full
        return res;
    }

    // The last token of each sequence becomes tokens[i]: a step reserved it before its value was
    // known (the engine's overlap: the token is still being sampled on the device). Only a token
    // past the computed horizon can change, so no published block holds it.
    void set_last_tokens(const std::vector<int64_t>& seq_ids, const std::vector<int64_t>& tokens) {
        if (tokens.size() != seq_ids.size())
            throw std::invalid_argument("set_last_tokens: seq_ids and tokens differ in length");
        for (size_t i = 0; i < seq_ids.size(); ++i) {
            Sequence& seq = get(seq_ids[i]);
            const int64_t len = static_cast<int64_t>(seq.tokens.size());
            if (seq.computed >= len)
                throw std::invalid_argument("set_last_tokens: the last token of sequence " +
                                            std::to_string(seq_ids[i]) + " is already computed");
            seq.tokens.back() = tokens[i];
            if (len % block_size_ == 0) seal_last_block(seq);  // hashed with the old value
        }
    }

    // A graph decode step's KV inputs. The engine's decode graphs keep each sequence's block
    // table in a row of a [num_rows, width] device table and refresh only what the row lacks.
    // Writes the KV slot of positions[i] of sequence i to slots[i] and, for every table entry
    // row rows[i] lacks, the pair (rows[i] * width + entry index, block id) to updates; returns
    // the number of pairs. A row lacks every entry when the sequence was last written to
    // another row (or never), or when another sequence wrote this row since; after that, the
    // entries past what it was given (new blocks) and any entry replaced by a copy-on-write.
    // Returns -1 and changes nothing when a row is outside [0, num_rows) or repeats, a table is
    // wider than width, a position is not one of the sequence's tokens, or the outputs are
    // too short (the step then runs without graphs).
    int64_t sync_decode_tables(const std::vector<int64_t>& seq_ids, const std::vector<int64_t>& positions,
                               const std::vector<int64_t>& rows, int64_t num_rows, int64_t width,
                               int32_t* slots, int64_t slots_len, int32_t* updates, int64_t updates_len) {
        const size_t n = seq_ids.size();
        if (positions.size() != n || rows.size() != n)
            throw std::invalid_argument("sync_decode_tables: seq_ids, positions and rows differ in length");
        if (static_cast<int64_t>(n) > slots_len || num_rows < 0 || width < 1) return -1;
        if (static_cast<int64_t>(row_owner_.size()) < num_rows) {
            row_owner_.resize(num_rows, -1);
            row_stamp_.resize(num_rows, 0);
        }
        // Check everything first: a refusal leaves the device rows' bookkeeping as it was.
        ++stamp_;
        int64_t needed = 0;
        std::vector<Sequence*> seqs(n);
        for (size_t i = 0; i < n; ++i) {
            Sequence& seq = get(seq_ids[i]);
            const int64_t r = rows[i];
            const int64_t len = static_cast<int64_t>(seq.tokens.size());
            const int64_t nb = static_cast<int64_t>(seq.table.size());
            if (r < 0 || r >= num_rows || row_stamp_[r] == stamp_ || nb > width || positions[i] < 0 ||
                positions[i] >= len)
                return -1;
            row_stamp_[r] = stamp_;
            needed += nb - (holds_row(seq, seq_ids[i], r) ? seq.device_len : 0);
            seqs[i] = &seq;
        }
        if (needed > updates_len) return -1;
        int64_t k = 0;
        for (size_t i = 0; i < n; ++i) {
            Sequence& seq = *seqs[i];
            const int64_t r = rows[i];
            if (!holds_row(seq, seq_ids[i], r)) {
                seq.device_row = r;
                seq.device_len = 0;
                row_owner_[r] = seq_ids[i];
            }
            const int64_t nb = static_cast<int64_t>(seq.table.size());
            for (int64_t j = seq.device_len; j < nb; ++j) {
                updates[2 * k] = static_cast<int32_t>(r * width + j);
                updates[2 * k + 1] = seq.table[j];
                ++k;
            }
            seq.device_len = nb;
            const int64_t p = positions[i];
            slots[i] = static_cast<int32_t>(static_cast<int64_t>(seq.table[p / block_size_]) * block_size_ +
                                            p % block_size_);
        }
        return k;
    }

    // A new device table (nothing on it yet): every sequence writes its whole row at its next sync.
    void forget_device_rows() { row_owner_.assign(row_owner_.size(), -1); }

    // Whether append_token would find a block for every one of these sequences at once.
    bool can_append_all(const std::vector<int64_t>& seq_ids) const {
        int64_t need = 0;
        for (int64_t id : seq_ids) need += append_need(get(id));
        return need <= free_count_;
    }

    void mark_computed_all(const std::vector<int64_t>& seq_ids, const std::vector<int64_t>& num_tokens) {
        if (num_tokens.size() != seq_ids.size())
            throw std::invalid_argument("mark_computed_all: seq_ids and num_tokens differ in length");
        for (size_t i = 0; i < seq_ids.size(); ++i) mark_computed(seq_ids[i], num_tokens[i]);
    }

    // A decode step's reservations in one call: sequence i, holding lengths[i] - 1 tokens, gets
    // last_tokens[i] (the token it sampled last step); one already holding lengths[i] gets
    // nothing. Stops before the first sequence in neither state or that needs a block when none
    // is free (left unchanged, for the caller's general path). Returns how many were handled
    // and their copy-on-writes, in order.
    std::pair<int64_t, std::vector<std::pair<int32_t, int32_t>>> append_last_tokens(
        const std::vector<int64_t>& seq_ids, const std::vector<int64_t>& last_tokens,
        const std::vector<int64_t>& lengths) {
        if (last_tokens.size() != seq_ids.size() || lengths.size() != seq_ids.size())
            throw std::invalid_argument("append_last_tokens: seq_ids, last_tokens and lengths differ in length");
        std::vector<std::pair<int32_t, int32_t>> cows;
        size_t i = 0;
        for (; i < seq_ids.size(); ++i) {
            const Sequence& seq = get(seq_ids[i]);
            const int64_t held = static_cast<int64_t>(seq.tokens.size());
            if (held == lengths[i]) continue;
            if (held != lengths[i] - 1 || append_need(seq) > free_count_) break;
            const AppendResult res = append_token(seq_ids[i], last_tokens[i]);
            if (res.cow) cows.push_back(*res.cow);
        }
        return {static_cast<int64_t>(i), std::move(cows)};
    }

    void fork(int64_t parent_id, int64_t child_id) {
        const Sequence& parent = get(parent_id);
        if (seqs_.count(child_id))
            throw std::invalid_argument("child sequence " + std::to_string(child_id) +
                                        " is already allocated");
        Sequence child = parent;  // copy (salt included) before emplace: emplace may rehash
        child.device_row = -1;       // the child's table is on no device row yet
        child.device_len = 0;
        for (int32_t b : child.table) ++blocks_[b].ref;
        seqs_.emplace(child_id, std::move(child));
    }

    void free(int64_t seq_id) {
        auto it = seqs_.find(seq_id);
        if (it == seqs_.end()) throw UnknownSequenceError(unknown(seq_id));
        const std::vector<int32_t>& table = it->second.table;
        for (auto r = table.rbegin(); r != table.rend(); ++r) release(*r);
        seqs_.erase(it);
    }

    std::vector<int32_t> block_table(int64_t seq_id) const { return get(seq_id).table; }
    std::vector<std::vector<int32_t>> block_tables(const std::vector<int64_t>& seq_ids) const {
        std::vector<std::vector<int32_t>> tables;
        tables.reserve(seq_ids.size());
        for (int64_t id : seq_ids) tables.push_back(get(id).table);
        return tables;
    }
    std::vector<int64_t> token_ids(int64_t seq_id) const { return get(seq_id).tokens; }
    int64_t num_tokens(int64_t seq_id) const {
        return static_cast<int64_t>(get(seq_id).tokens.size());
    }
    std::optional<uint64_t> cache_salt(int64_t seq_id) const { return get(seq_id).salt; }
    std::vector<int64_t> sequence_ids() const {
        std::vector<int64_t> ids;
        ids.reserve(seqs_.size());
        for (const auto& kv : seqs_) ids.push_back(kv.first);
        return ids;
    }

    int64_t slot_of(int64_t seq_id, int64_t position) const {
        const Sequence& seq = get(seq_id);
        const int64_t n = static_cast<int64_t>(seq.tokens.size());
        if (position < 0) position += n;
        if (position < 0 || position >= n)
            throw std::out_of_range("position out of range for sequence " + std::to_string(seq_id) +
                                    " of " + std::to_string(n) + " tokens");
        return static_cast<int64_t>(seq.table[position / block_size_]) * block_size_ +
               position % block_size_;
    }

    std::vector<int64_t> slot_mapping(int64_t seq_id, int64_t start, std::optional<int64_t> end) const {
        const Sequence& seq = get(seq_id);
        const int64_t n = static_cast<int64_t>(seq.tokens.size());
        const int64_t e = end ? *end : n;
        if (start < 0 || e < start || e > n)
            throw std::out_of_range("slot_mapping: need 0 <= start <= end <= " + std::to_string(n));
        std::vector<int64_t> out;
        out.reserve(e - start);
        for (int64_t p = start; p < e; ++p)
            out.push_back(static_cast<int64_t>(seq.table[p / block_size_]) * block_size_ +
                          p % block_size_);
        return out;
    }

    int32_t ref_count(int64_t block_id) const { return block(block_id).ref; }
    std::optional<uint64_t> block_hash(int64_t block_id) const {
        const Block& b = block(block_id);
        if (!b.has_hash) return std::nullopt;
        return b.hash;
    }
    bool is_cached(int64_t block_id) const { return block(block_id).registered; }

    py::dict stats() const {
        py::dict d;
        d["num_blocks"] = num_blocks_;
        d["block_size"] = block_size_;
        d["num_free_blocks"] = free_count_;
        d["num_cached_blocks"] = num_cached_blocks();
        d["num_sequences"] = num_sequences();
        d["prefix_cache_queries"] = stat_queries_;  // prompt tokens passed to allocate
        d["prefix_cache_hits"] = stat_hits_;        // of which reported as cached
        d["prefix_cache_hit_rate"] =
            stat_queries_ ? static_cast<double>(stat_hits_) / static_cast<double>(stat_queries_) : 0.0;
        d["cow_copies"] = stat_cow_;
        d["evictions"] = stat_evictions_;  // cache entries lost to reuse of their block
        return d;
    }
    void reset_stats() { stat_queries_ = stat_hits_ = stat_cow_ = stat_evictions_ = 0; }

    void reset() {
        seqs_.clear();
        forget_device_rows();
        hash_to_block_.clear();
        for (int32_t i = 0; i < num_blocks_; ++i) {
            Block& b = blocks_[i];
            b = Block{};
            b.in_free = true;
            b.prev = i - 1;
            b.next = (i + 1 < num_blocks_) ? i + 1 : -1;
        }
        head_ = 0;
        tail_ = num_blocks_ - 1;
        free_count_ = num_blocks_;
        reset_stats();
    }

    void clear_prefix_cache() {
        hash_to_block_.clear();
        for (Block& b : blocks_) {
            b.registered = false;
            if (b.ref == 0)
                drop_hash(b);
            else
                b.stale = true;  // its KV predates the clear: never cache it again
        }
    }

    void check_invariants() const {
        auto fail = [](const std::string& msg) { throw std::runtime_error("invariant violated: " + msg); };
        auto bid = [](int32_t b) { return "block " + std::to_string(b); };
        // Reference counts from the block tables, and per-sequence shape.
        std::vector<int64_t> refs(num_blocks_, 0);
        std::vector<uint64_t> scratch;
        for (const auto& kv : seqs_) {
            const Sequence& s = kv.second;
            const std::string sid = "sequence " + std::to_string(kv.first);
            const int64_t n = static_cast<int64_t>(s.tokens.size());
            if (n < 1) fail(sid + " has no tokens");
            if (s.computed < 0 || s.computed > n) fail(sid + " has a computed horizon out of range");
            if (static_cast<int64_t>(s.table.size()) != blocks_for(n))
                fail(sid + " has " + std::to_string(s.table.size()) + " blocks for " +
                     std::to_string(n) + " tokens");
            std::optional<uint64_t> parent = s.salt;  // the root block chains from the salt
            for (size_t i = 0; i < s.table.size(); ++i) {
                const int32_t b = s.table[i];
                if (b < 0 || b >= num_blocks_) fail(sid + " points to invalid " + bid(b));
                ++refs[b];
                const Block& blk = blocks_[b];
                const bool full = static_cast<int64_t>(i + 1) * block_size_ <= n;
                if (!full) {
                    if (blk.has_hash) fail(sid + ": partial last " + bid(b) + " has a hash");
                    continue;
                }
                if (!blk.has_hash) fail(sid + ": full " + bid(b) + " has no hash");
                const int64_t* toks = s.tokens.data() + i * block_size_;
                if (static_cast<int64_t>(blk.tokens.size()) != block_size_ ||
                    !std::equal(blk.tokens.begin(), blk.tokens.end(), toks))
                    fail(sid + ": " + bid(b) + " stores other tokens than the sequence");
                if (blk.has_parent != parent.has_value() || (parent && blk.parent_hash != *parent))
                    fail(sid + ": " + bid(b) + " has a wrong parent hash");
                if (blk.parent_is_salt != (i == 0 && s.salt.has_value()))
                    fail(sid + ": " + bid(b) +
                         (blk.parent_is_salt ? " links to a salt but is not the root of a salted sequence"
                                             : " is the root of a salted sequence but does not link to its salt"));
                if (blk.hash != hash_tokens(parent, toks, block_size_, scratch))
                    fail(sid + ": " + bid(b) + " hash does not match its tokens");
                if (static_cast<int64_t>(i + 1) * block_size_ <= s.computed && !blk.computed)
                    fail(sid + ": " + bid(b) + " is inside the computed horizon but not marked computed");
                parent = blk.hash;
            }
        }
        int64_t zero = 0;
        for (int32_t b = 0; b < num_blocks_; ++b) {
            const Block& blk = blocks_[b];
            if (blk.ref != refs[b])
                fail(bid(b) + " has ref " + std::to_string(blk.ref) + " but " + std::to_string(refs[b]) +
                     " block-table entries");
            if (blk.ref == 0) ++zero;
            if (blk.in_free != (blk.ref == 0))
                fail(bid(b) + (blk.in_free ? " is in the free pool with ref " + std::to_string(blk.ref)
                                           : " has ref 0 but is not in the free pool"));
            if (blk.registered) {
                auto it = hash_to_block_.find(blk.hash);
                if (!blk.has_hash || it == hash_to_block_.end() || it->second != b)
                    fail(bid(b) + " is marked cached but the hash map does not point to it");
                if (blk.stale) fail(bid(b) + " is stale but cached");
                if (!blk.computed) fail(bid(b) + " is cached but not computed");
            }
            if (blk.ref == 0 && blk.has_hash && !blk.registered)
                fail("free " + bid(b) + " keeps a hash that is not in the cache");
        }
        if (zero != free_count_)
            fail("free count " + std::to_string(free_count_) + " but " + std::to_string(zero) +
                 " blocks have ref 0");
        // The free list: well linked, no repeats, right length.
        std::vector<char> seen(num_blocks_, 0);
        int64_t count = 0;
        int32_t prev = -1;
        for (int32_t b = head_; b != -1; b = blocks_[b].next) {
            if (b < 0 || b >= num_blocks_) fail("free list holds invalid " + bid(b));
            if (seen[b]) fail(bid(b) + " appears twice in the free list");
            seen[b] = 1;
            if (!blocks_[b].in_free) fail(bid(b) + " is in the free list but not marked free");
            if (blocks_[b].prev != prev) fail("free list back link broken at " + bid(b));
            prev = b;
            if (++count > num_blocks_) fail("free list has a cycle");
        }
        if (prev != tail_) fail("free list tail is wrong");
        if (count != free_count_)
            fail("free list has " + std::to_string(count) + " blocks, free count is " +
                 std::to_string(free_count_));
        // The hash map.
        for (const auto& kv : hash_to_block_) {
            const int32_t b = kv.second;
            if (b < 0 || b >= num_blocks_) fail("hash map points to invalid " + bid(b));
            const Block& blk = blocks_[b];
            if (!blk.registered || !blk.has_hash || blk.hash != kv.first)
                fail("hash map entry for " + bid(b) + " does not match the block's hash");
            if (static_cast<int64_t>(blk.tokens.size()) != block_size_)
                fail("cached " + bid(b) + " does not store a full block of tokens");
            if (blk.parent_is_salt && !blk.has_parent)
                fail("cached " + bid(b) + " links to a salt it does not store");
            std::optional<uint64_t> parent;
            if (blk.has_parent) parent = blk.parent_hash;
            if (hash_tokens(parent, blk.tokens.data(), blk.tokens.size(), scratch) != kv.first)
                fail("cached " + bid(b) + " hash does not match its stored tokens");
        }
    }

    std::string repr() const {
        std::ostringstream os;
        os << "BlockManager(num_blocks=" << num_blocks_ << ", block_size=" << block_size_
           << ", watermark=" << watermark_ << "; free=" << free_count_
           << ", cached=" << hash_to_block_.size() << ", sequences=" << seqs_.size() << ")";
        return os.str();
    }

   private:
    struct Block {
        int32_t ref = 0;
        bool in_free = true;
        bool has_hash = false;    // a full block whose hash/tokens are kept
        bool registered = false;  // hash_to_block_[hash] == this block
        bool has_parent = false;  // parent_hash is set (a parent block's hash, or a salt)
        bool parent_is_salt = false;  // root block of a salted sequence: parent_hash is the salt
        bool stale = false;       // KV predates clear_prefix_cache()
        bool computed = false;    // full and inside some sequence's computed horizon
        uint64_t hash = 0;
        uint64_t parent_hash = 0;     // parent block's hash, or the salt (parent_is_salt)
        std::vector<int64_t> tokens;  // block_size ids when has_hash
        int32_t prev = -1, next = -1;  // free-list links
    };
    struct Sequence {
        std::vector<int64_t> tokens;
        std::vector<int32_t> table;
        int64_t computed = 0;  // leading tokens whose KV is written or scheduled
        std::optional<uint64_t> salt;  // cache salt: the policy its KV comes from (None: clean)
        // The device row its table was last written to (sync_decode_tables; -1: none) and how
        // many leading entries that row holds as they are now.
        int64_t device_row = -1;
        int64_t device_len = 0;
    };
    struct Plan {
        std::vector<uint64_t> hashes;  // of the full blocks
        std::vector<int32_t> hits;     // leading cache hits
        int64_t num_blocks = 0;
        int64_t required = 0;  // free-pool blocks the allocation consumes
    };

    Plan make_plan(const std::vector<int64_t>& tokens, const std::optional<uint64_t>& salt) {
        Plan plan;
        const int64_t n = static_cast<int64_t>(tokens.size());
        plan.num_blocks = blocks_for(n);
        const int64_t nfull = n / block_size_;
        const int64_t max_hit = (n - 1) / block_size_;  // blocks entirely before the last token
        plan.hashes.reserve(nfull);
        std::optional<uint64_t> parent = salt;  // the root block chains from the salt
        for (int64_t i = 0; i < nfull; ++i) {
            uint64_t h = hash_tokens(parent, tokens.data() + i * block_size_, block_size_, scratch_);
            plan.hashes.push_back(h);
            parent = h;
        }
        int64_t free_hits = 0;
        for (int64_t i = 0; i < max_hit; ++i) {
            auto it = hash_to_block_.find(plan.hashes[i]);
            if (it == hash_to_block_.end()) break;
            const Block& blk = blocks_[it->second];
            const int64_t* toks = tokens.data() + i * block_size_;
            bool same_parent;
            if (i == 0)  // an unsalted root has no parent; a salted one links to the same salt
                same_parent = salt ? (blk.has_parent && blk.parent_is_salt && blk.parent_hash == *salt)
                                   : !blk.has_parent;
            else
                same_parent = blk.has_parent && !blk.parent_is_salt && blk.parent_hash == plan.hashes[i - 1];
            if (!same_parent || static_cast<int64_t>(blk.tokens.size()) != block_size_ ||
                !std::equal(blk.tokens.begin(), blk.tokens.end(), toks))
                break;
            plan.hits.push_back(it->second);
            if (blk.ref == 0) ++free_hits;
        }
        plan.required = plan.num_blocks - static_cast<int64_t>(plan.hits.size()) + free_hits;
        return plan;
    }

    // The sequence's last block is full: hash it (chained from the block before, or the salt).
    void seal_last_block(Sequence& seq) {
        const size_t nb = seq.table.size();
        const int32_t b = seq.table.back();
        std::optional<uint64_t> parent = seq.salt;  // the root block chains from the salt
        bool stale = blocks_[b].stale;
        if (nb > 1) {
            const Block& pb = blocks_[seq.table[nb - 2]];
            parent = pb.hash;
            stale = stale || pb.stale;
        }
        const int64_t* toks = seq.tokens.data() + (nb - 1) * block_size_;
        uint64_t h = hash_tokens(parent, toks, block_size_, scratch_);
        set_full(b, h, parent, nb == 1 && seq.salt.has_value(), toks);
        blocks_[b].stale = stale;
    }

    // Row r holds the sequence's table (as far as device_len): the sequence wrote it last.
    bool holds_row(const Sequence& seq, int64_t seq_id, int64_t r) const {
        return seq.device_row == r && row_owner_[r] == seq_id;
    }

    int64_t append_need(const Sequence& seq) const {
        const int64_t len = static_cast<int64_t>(seq.tokens.size());
        if (len % block_size_ == 0) return 1;                  // last block full: new block
        return blocks_[seq.table.back()].ref > 1 ? 1 : 0;      // shared partial block: CoW
    }

    const Sequence& get(int64_t seq_id) const {
        auto it = seqs_.find(seq_id);
        if (it == seqs_.end()) throw UnknownSequenceError(unknown(seq_id));
        return it->second;
    }
    Sequence& get(int64_t seq_id) {
        auto it = seqs_.find(seq_id);
        if (it == seqs_.end()) throw UnknownSequenceError(unknown(seq_id));
        return it->second;
    }
    static std::string unknown(int64_t seq_id) {
        return "unknown sequence " + std::to_string(seq_id);
    }
    const Block& block(int64_t block_id) const {
        if (block_id < 0 || block_id >= num_blocks_)
            throw std::out_of_range("block_id " + std::to_string(block_id) + " out of range [0, " +
                                    std::to_string(num_blocks_) + ")");
        return blocks_[block_id];
    }

    // parent: the parent block's hash, the salt (parent_is_salt: root of a salted
    // sequence), or none (root of an unsalted sequence).
    void set_full(int32_t b, uint64_t h, const std::optional<uint64_t>& parent, bool parent_is_salt,
                  const int64_t* toks) {
        Block& blk = blocks_[b];
        blk.has_hash = true;
        blk.hash = h;
        blk.has_parent = parent.has_value();
        blk.parent_is_salt = parent_is_salt;
        blk.parent_hash = parent.value_or(0);
        blk.tokens.assign(toks, toks + block_size_);
    }

    // Raises the sequence's computed horizon to n tokens (never lowers it); the
    // full blocks it newly covers become computed and may enter the cache.
    void advance_computed(Sequence& seq, int64_t n) {
        if (n <= seq.computed) return;
        const int64_t first = seq.computed / block_size_;
        const int64_t last = n / block_size_;  // blocks [first, last) are now fully inside
        for (int64_t i = first; i < last; ++i) {
            const int32_t b = seq.table[i];
            blocks_[b].computed = true;
            try_register(b);
        }
        seq.computed = n;
    }

    // Registers a full, computed, non-stale block under its hash unless another block holds it.
    bool try_register(int32_t b) {
        Block& blk = blocks_[b];
        if (!blk.has_hash || blk.stale || !blk.computed) return false;
        if (blk.registered) return true;
        auto res = hash_to_block_.emplace(blk.hash, b);
        if (!res.second) return false;
        blk.registered = true;
        return true;
    }

    void drop_hash(Block& blk) {
        if (blk.registered) {
            auto it = hash_to_block_.find(blk.hash);
            if (it != hash_to_block_.end() && it->second == static_cast<int32_t>(&blk - blocks_.data()))
                hash_to_block_.erase(it);
            blk.registered = false;
        }
        blk.has_hash = false;
        blk.computed = false;
        blk.has_parent = false;
        blk.parent_is_salt = false;
        blk.hash = blk.parent_hash = 0;
        blk.tokens.clear();
    }

    // ref -> ref - 1; at 0 the block joins the free pool (see the policy above).
    void release(int32_t b) {
        Block& blk = blocks_[b];
        if (--blk.ref > 0) return;
        if (blk.has_hash && try_register(b)) {
            push_free_tail(b);
        } else {
            drop_hash(blk);
            blk.stale = false;
            push_free_head(b);
        }
    }

    // Takes the block at the head of the free pool, evicting its cache entry.
    int32_t pop_free() {
        const int32_t b = head_;  // callers checked free_count_ > 0
        unlink_free(b);
        Block& blk = blocks_[b];
        if (blk.registered) ++stat_evictions_;
        drop_hash(blk);
        blk.stale = false;
        return b;
    }

    void unlink_free(int32_t b) {
        Block& blk = blocks_[b];
        if (blk.prev != -1) blocks_[blk.prev].next = blk.next; else head_ = blk.next;
        if (blk.next != -1) blocks_[blk.next].prev = blk.prev; else tail_ = blk.prev;
        blk.prev = blk.next = -1;
        blk.in_free = false;
        --free_count_;
    }
    void push_free_tail(int32_t b) {
        Block& blk = blocks_[b];
        blk.prev = tail_;
        blk.next = -1;
        if (tail_ != -1) blocks_[tail_].next = b; else head_ = b;
        tail_ = b;
        blk.in_free = true;
        ++free_count_;
    }
    void push_free_head(int32_t b) {
        Block& blk = blocks_[b];
        blk.prev = -1;
        blk.next = head_;
        if (head_ != -1) blocks_[head_].prev = b; else tail_ = b;
        head_ = b;
        blk.in_free = true;
        ++free_count_;
    }

    int32_t num_blocks_;
    int32_t block_size_;
    double watermark_;
    int64_t watermark_blocks_ = 0;
    std::vector<Block> blocks_;
    int32_t head_ = -1, tail_ = -1;
    int64_t free_count_ = 0;
    std::unordered_map<uint64_t, int32_t> hash_to_block_;
    std::unordered_map<int64_t, Sequence> seqs_;
    std::vector<uint64_t> scratch_;
    std::vector<int64_t> row_owner_;  // per device row: the sequence that wrote it last (-1: none)
    std::vector<uint64_t> row_stamp_;  // per device row: the sync_decode_tables call that last named it
    uint64_t stamp_ = 0;
    int64_t stat_queries_ = 0, stat_hits_ = 0, stat_cow_ = 0, stat_evictions_ = 0;
};

}  // namespace psnrl_blocks
