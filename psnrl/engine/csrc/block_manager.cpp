// The pybind11 module psnrl.engine._block_manager: the block manager of block_manager.hpp
// (its model: README.md beside this file), typed for Python in psnrl/engine/block_manager.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_manager.hpp"

using namespace psnrl_blocks;

PYBIND11_MODULE(_block_manager, m) {
    if (!host_is_little_endian())
        throw std::runtime_error("psnrl.engine._block_manager assumes a little-endian host");

    m.doc() =
        "KV-cache block manager of the paged-attention engine (C++): paged allocation, "
        "hash-based prefix caching with token verification, ref counts and copy-on-write. "
        "See psnrl/engine/block_manager.py for the documented API.";

    py::register_exception<OutOfBlocksError>(m, "OutOfBlocks", PyExc_RuntimeError);
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const UnknownSequenceError& e) {
            py::set_error(PyExc_KeyError, e.what());
        }
    });
    m.attr("OutOfBlocks").attr("__doc__") =
        "Not enough free KV blocks for the operation (a RuntimeError). The manager's state is "
        "unchanged: allocate() and append_token() are all-or-nothing.";

    m.def(
        "hash_block",
        [](std::optional<uint64_t> parent_hash, const std::vector<int64_t>& token_ids) {
            std::vector<uint64_t> scratch;
            return hash_tokens(parent_hash, token_ids.data(), token_ids.size(), scratch);
        },
        py::arg("parent_hash"), py::arg("token_ids"),
        "Chained block hash: XXH64 (seed 0) of [le64(parent_hash)] + le64(token) for each token. "
        "parent_hash is the previous block's hash; for a sequence's first block it is the "
        "sequence's cache salt, or None if it has none.");

    py::class_<AppendResult>(m, "AppendResult",
                             "Result of append_token: where the new token's KV goes, and the "
                             "copy-on-write the engine must do first, if any.")
        .def_readonly("slot", &AppendResult::slot,
                      "Flat KV slot of the new token: block_id * block_size + offset.")
        .def_readonly("block_id", &AppendResult::block_id, "Block that holds the new token.")
        .def_readonly("new_block", &AppendResult::new_block,
                      "True if a block was taken from the free pool (new last block or CoW copy).")
        .def_readonly("cow", &AppendResult::cow,
                      "(src_block, dst_block) if the shared last block was copied on write: the "
                      "engine copies the KV rows of src into dst before writing slot; else None.")
        .def("__repr__", [](const AppendResult& r) {
            std::ostringstream os;
            os << "AppendResult(slot=" << r.slot << ", block_id=" << r.block_id
               << ", new_block=" << (r.new_block ? "True" : "False") << ", cow=";
            if (r.cow) os << "(" << r.cow->first << ", " << r.cow->second << ")"; else os << "None";
            os << ")";
            return os.str();
        })
        .def("__eq__", [](const AppendResult& a, const AppendResult& b) {
            return a.slot == b.slot && a.block_id == b.block_id && a.new_block == b.new_block &&
                   a.cow == b.cow;
        });

    py::class_<BlockManager>(m, "BlockManager",
                             "Paged KV-cache block manager with prefix caching (see "
                             "psnrl/engine/block_manager.py).")
        .def(py::init<int64_t, int64_t, double>(), py::arg("num_blocks"), py::arg("block_size"),
             py::arg("watermark") = 0.01,
             "Blocks 0..num_blocks-1 of block_size slots; can_allocate keeps "
             "int(watermark * num_blocks) blocks free. ValueError on bad arguments.")
        .def_property_readonly("num_blocks", &BlockManager::num_blocks)
        .def_property_readonly("block_size", &BlockManager::block_size)
        .def_property_readonly("watermark", &BlockManager::watermark)
        .def_property_readonly("watermark_blocks", &BlockManager::watermark_blocks,
                               "int(watermark * num_blocks): blocks can_allocate keeps free.")
        .def("can_allocate", &BlockManager::can_allocate, py::arg("num_tokens"),
             "Whether a new sequence of num_tokens tokens fits while keeping watermark_blocks "
             "free, ignoring possible prefix-cache hits (conservative).")
        .def("num_required_blocks", &BlockManager::num_required_blocks, py::arg("token_ids"),
             py::arg("cache_salt") = py::none(),
             "Exact number of free blocks allocate(token_ids, cache_salt=cache_salt) would take "
             "now (fresh blocks plus cache hits on free blocks), without the watermark.")
        .def("allocate", &BlockManager::allocate, py::arg("seq_id"), py::arg("token_ids"),
             py::arg("num_scheduled") = py::none(), py::arg("cache_salt") = py::none(),
             "Give a new sequence blocks for all its tokens, reusing prefix-cache hits. Returns "
             "the number of leading tokens whose KV is already computed (a multiple of "
             "block_size, always < len(token_ids)). num_scheduled: leading tokens whose KV the "
             "coming step writes (default all; pass less for chunked prefill, then "
             "mark_computed). cache_salt: optional uint64 naming the policy the sequence's KV "
             "comes from (e.g. a noise spec); the root block hashes with it as its parent, so "
             "the sequence shares cached blocks only with sequences of the same salt (None "
             "only with unsalted ones); fork() passes it on. ValueError if seq_id exists, "
             "token_ids is empty or num_scheduled is out of range; OutOfBlocks if the blocks do "
             "not fit (state unchanged).")
        .def("mark_computed", &BlockManager::mark_computed, py::arg("seq_id"), py::arg("num_tokens"),
             "The KV of the first num_tokens tokens is written (call it once the step that writes "
             "it has completed): their full blocks may be shared through the prefix cache. Never "
             "lowers the mark.")
        .def("num_computed", &BlockManager::num_computed, py::arg("seq_id"),
             "The sequence's computed horizon (see mark_computed).")
        .def("can_append", &BlockManager::can_append, py::arg("seq_id"),
             "Whether append_token(seq_id, ...) would find the block it needs (no watermark).")
        .def("append_token", &BlockManager::append_token, py::arg("seq_id"), py::arg("token_id"),
             "Add one token, about to be computed; returns AppendResult(slot, block_id, new_block, "
             "cow). It does not move the computed horizon (see mark_computed). OutOfBlocks if a "
             "block is needed and none is free (state unchanged).")
        .def("fork", &BlockManager::fork, py::arg("parent_seq_id"), py::arg("child_seq_id"),
             "The child shares all the parent's blocks (ref + 1), its token list and its cache "
             "salt.")
        .def("free", &BlockManager::free, py::arg("seq_id"),
             "Release the sequence's blocks (ref - 1 each, last block first). KeyError if unknown.")
        .def("append_last_tokens", &BlockManager::append_last_tokens, py::arg("seq_ids"),
             py::arg("last_tokens"), py::arg("lengths"),
             "A decode step's append_token calls in one: each sequence holding lengths[i] - 1 "
             "tokens gets last_tokens[i], one holding lengths[i] nothing; stops before the first "
             "in neither state or needing a block when none is free (left unchanged). Returns "
             "(how many were handled, their copy-on-writes in order).")
        .def("set_last_tokens", &BlockManager::set_last_tokens, py::arg("seq_ids"), py::arg("tokens"),
             "The last token of sequence i becomes tokens[i] (it was reserved before its value was "
             "known); ValueError if that token is already computed.")
        .def(
            "sync_decode_tables",
            [](BlockManager& bm, const std::vector<int64_t>& seq_ids, const std::vector<int64_t>& positions,
               const std::vector<int64_t>& rows, int64_t num_rows, int64_t width, py::array_t<int32_t> slots,
               py::array_t<int32_t> updates) {
                if (slots.ndim() != 1 || slots.strides(0) != sizeof(int32_t))
                    throw std::invalid_argument("sync_decode_tables: slots must be a contiguous 1-D int32 array");
                if (updates.ndim() != 2 || updates.shape(1) != 2 ||
                    updates.strides(1) != sizeof(int32_t) || updates.strides(0) != 2 * sizeof(int32_t))
                    throw std::invalid_argument("sync_decode_tables: updates must be a contiguous [n, 2] int32 array");
                return bm.sync_decode_tables(seq_ids, positions, rows, num_rows, width, slots.mutable_data(),
                                             slots.shape(0), updates.mutable_data(), updates.shape(0));
            },
            py::arg("seq_ids"), py::arg("positions"), py::arg("rows"), py::arg("num_rows"), py::arg("width"),
            py::arg("slots").noconvert(), py::arg("updates").noconvert(),
            "A graph decode step's KV inputs, for block tables kept on the device in the rows of a "
            "[num_rows, width] table: writes the KV slot of positions[i] of sequence i to slots[i] and, "
            "for each table entry row rows[i] lacks, (rows[i] * width + entry, block id) to updates "
            "(int32 numpy arrays, written in place); returns the number of pairs. A row lacks every "
            "entry when the sequence last wrote another row or another sequence wrote it since; then "
            "only new blocks and copy-on-write replacements. -1 (nothing changed) if a row is out of "
            "range or repeats, a table is wider than width, a position is out of range or the outputs "
            "are too short.")
        .def("forget_device_rows", &BlockManager::forget_device_rows,
             "A new device table holds nothing: every sequence writes its whole row at its next "
             "sync_decode_tables.")
        .def("can_append_all", &BlockManager::can_append_all, py::arg("seq_ids"),
             "Whether append_token would find a block for every one of these sequences at once.")
        .def("mark_computed_all", &BlockManager::mark_computed_all, py::arg("seq_ids"), py::arg("num_tokens"),
             "mark_computed for each sequence, in one call.")
        .def("block_table", &BlockManager::block_table, py::arg("seq_id"))
        .def("block_tables", &BlockManager::block_tables, py::arg("seq_ids"),
             "The block tables of these sequences, in one call.")
        .def("token_ids", &BlockManager::token_ids, py::arg("seq_id"))
        .def("num_tokens", &BlockManager::num_tokens, py::arg("seq_id"))
        .def("cache_salt", &BlockManager::cache_salt, py::arg("seq_id"),
             "The sequence's cache salt (see allocate), or None.")
        .def("sequence_ids", &BlockManager::sequence_ids)
        .def("num_sequences", &BlockManager::num_sequences)
        .def("has_sequence", &BlockManager::has_sequence, py::arg("seq_id"))
        .def("__contains__", &BlockManager::has_sequence, py::arg("seq_id"))
        .def("slot_of", &BlockManager::slot_of, py::arg("seq_id"), py::arg("position"),
             "KV slot of token `position` (negative counts from the end). IndexError if out of range.")
        .def("slot_mapping", &BlockManager::slot_mapping, py::arg("seq_id"), py::arg("start") = 0,
             py::arg("end") = py::none(), "KV slots of positions [start, end) (end defaults to the length).")
        .def("num_free_blocks", &BlockManager::num_free_blocks,
             "Blocks with ref count 0, including cached ones that can still be hit.")
        .def("num_cached_blocks", &BlockManager::num_cached_blocks,
             "Blocks registered in the prefix cache (referenced or free).")
        .def("ref_count", &BlockManager::ref_count, py::arg("block_id"))
        .def("block_hash", &BlockManager::block_hash, py::arg("block_id"),
             "The chained hash a full block holds, or None.")
        .def("is_cached", &BlockManager::is_cached, py::arg("block_id"),
             "Whether the block is registered in the prefix cache.")
        .def("stats", &BlockManager::stats,
             "Counters: prefix_cache_queries/hits (tokens), hit rate, cow_copies, evictions, ...")
        .def("reset_stats", &BlockManager::reset_stats)
        .def("check_invariants", &BlockManager::check_invariants,
             "Full consistency check (O(blocks + tokens)): ref counts vs block tables, free list, "
             "hash map, chained hashes and parent links (salted roots link to their sequence's "
             "salt); RuntimeError naming the first violation.")
        .def("reset", &BlockManager::reset, "Drop every sequence and cache entry; all blocks free.")
        .def("clear_prefix_cache", &BlockManager::clear_prefix_cache,
             "Forget all cached KV (e.g. after a weight update): empties the cache, drops the "
             "hashes of free blocks, and keeps blocks of live sequences out of the cache for good.")
        .def("__repr__", &BlockManager::repr);
}
