// ExpertPool: every expert of every MoE layer, once, in one page-locked host arena.
//
// Invariants:
// - An expert's tensors are packed contiguously, each starting at a multiple of kTensorAlignment bytes
//   from the expert's start, and every expert starts at a multiple of kTensorAlignment in the arena:
//   one expert moves to the GPU with one copy, and its tensors can be viewed in place at any dtype.
// - Layouts are fixed at construction; only bytes change afterwards (write()).
// - The arena is freed by the last owner of its Buffer, so zero-copy views handed out keep it alive.
// - A shared arena (several processes of one host, one per GPU) is one anonymous shared-memory file:
//   the process that creates it keeps the file open, and the others map it through
//   /proc/<pid>/fd/<fd> (shared_path()) and page-lock it for their own device. Host memory is spent
//   once whatever the number of processes; each unmaps its view when its Buffer goes. A header page
//   before the arena holds a magic number, the arena's size and a hash of the pool's layouts: a file
//   that is not such a pool, or a pool of other layouts, is refused.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "expertflow/backend.h"

namespace expertflow {

constexpr size_t kTensorAlignment = 256;

inline size_t align_up(size_t value, size_t alignment) { return (value + alignment - 1) / alignment * alignment; }

// One allocation from a backend, released on destruction (pinned host or device memory).
class Buffer {
 public:
  enum class Kind { kPinned, kDevice, kShared };
  Buffer(std::shared_ptr<Backend> backend, Kind kind, size_t bytes);
  // A shared host arena: created (attach_path empty) or mapped from another process's shared_path().
  // `layout_tag` identifies what the arena holds; attaching to one with another tag is refused.
  Buffer(std::shared_ptr<Backend> backend, size_t bytes, const std::string& attach_path, uint64_t layout_tag);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  uint8_t* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Kind kind() const { return kind_; }
  const std::shared_ptr<Backend>& backend() const { return backend_; }
  // Where other processes of this host map a shared arena ("" for others).
  const std::string& shared_path() const { return shared_path_; }

 private:
  std::shared_ptr<Backend> backend_;
  Kind kind_;
  size_t bytes_;
  uint8_t* data_ = nullptr;
  int fd_ = -1;  // the creator's shared-memory file, kept open while others may attach
  std::string shared_path_;
  uint8_t* mapping_ = nullptr;  // shared: the header page, then the arena (data_)
  size_t mapping_bytes_ = 0;
};

struct TensorSpec {
  std::string name;
  std::string dtype;            // carried for the caller ("bfloat16", "float32", ...)
  std::vector<int64_t> shape;
  size_t itemsize = 0;
  size_t offset = 0;            // from the expert's first byte; multiple of kTensorAlignment
  size_t nbytes = 0;
};

struct ExpertLayout {
  std::vector<TensorSpec> tensors;
  size_t expert_bytes = 0;      // packed size, a multiple of kTensorAlignment

  // Fills offsets and sizes; throws on empty names, duplicate names or non-positive sizes.
  static ExpertLayout pack(std::vector<TensorSpec> tensors);
  int tensor_index(const std::string& name) const;  // throws when absent
};

class ExpertPool {
 public:
  // layer_layouts[l] is the layout of every expert of layer l; num_experts[l] how many experts it has.
  // shared: the arena is shared host memory, created here (attach_path empty) or mapped from another
  // process's pool (its shared_path()), whose layouts must be the same.
  ExpertPool(std::shared_ptr<Backend> backend, std::vector<int> num_experts, std::vector<ExpertLayout> layer_layouts,
             bool shared = false, const std::string& attach_path = "");

  int num_layers() const { return static_cast<int>(num_experts_.size()); }
  int num_experts(int layer) const;
  const ExpertLayout& layout(int layer) const;
  size_t max_expert_bytes() const { return max_expert_bytes_; }
  size_t total_bytes() const { return arena_->bytes(); }
  const std::string& shared_path() const { return arena_->shared_path(); }
  // A hash of the layouts (expert counts; tensor names, dtypes, shapes, offsets): same model, same tag.
  uint64_t layout_tag() const;

  const uint8_t* expert_data(int layer, int expert) const;
  size_t expert_bytes(int layer) const { return layout(layer).expert_bytes; }
  // Copies `bytes` from src into tensor `tensor` of (layer, expert) at byte `offset` within the tensor.
  void write(int layer, int expert, int tensor, const void* src, size_t bytes, size_t offset = 0);
  // Throws unless 0 <= layer < num_layers and 0 <= expert < num_experts(layer).
  void check_expert(int layer, int expert) const;

  const std::shared_ptr<Buffer>& arena() const { return arena_; }
  const std::shared_ptr<Backend>& backend() const { return backend_; }

 private:
  std::shared_ptr<Backend> backend_;
  std::vector<int> num_experts_;
  std::vector<ExpertLayout> layouts_;
  std::vector<size_t> layer_offsets_;
  size_t max_expert_bytes_ = 0;
  std::shared_ptr<Buffer> arena_;
};

}  // namespace expertflow
