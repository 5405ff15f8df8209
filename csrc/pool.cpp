// ExpertPool: packing of expert layouts and the pinned arena. See include/expertflow/pool.h.
#include "expertflow/pool.h"

#include <cstring>
#include <set>

#include "expertflow/error.h"

namespace expertflow {

Buffer::Buffer(std::shared_ptr<Backend> backend, Kind kind, size_t bytes)
    : backend_(std::move(backend)), kind_(kind), bytes_(bytes) {
  data_ = static_cast<uint8_t*>(kind == Kind::kPinned ? backend_->alloc_pinned(bytes) : backend_->alloc_device(bytes));
}

Buffer::~Buffer() {
  if (kind_ == Kind::kPinned) {
    backend_->free_pinned(data_);
  } else {
    backend_->free_device(data_);
  }
}

ExpertLayout ExpertLayout::pack(std::vector<TensorSpec> tensors) {
  EF_CHECK(!tensors.empty(), "an expert layout needs at least one tensor");
  ExpertLayout layout;
  std::set<std::string> names;
  size_t offset = 0;
  for (auto& spec : tensors) {
    EF_CHECK(!spec.name.empty(), "expert tensor names must not be empty");
    EF_CHECK(names.insert(spec.name).second, "expert tensor '" << spec.name << "' is listed twice");
    EF_CHECK(spec.itemsize > 0, "expert tensor '" << spec.name << "' has itemsize 0");
    size_t count = 1;
    for (int64_t dim : spec.shape) {
      EF_CHECK(dim > 0, "expert tensor '" << spec.name << "' has a non-positive dimension " << dim);
      count *= static_cast<size_t>(dim);
    }
    spec.nbytes = count * spec.itemsize;
    spec.offset = offset;
    offset = align_up(offset + spec.nbytes, kTensorAlignment);
  }
  layout.tensors = std::move(tensors);
  layout.expert_bytes = offset;
  return layout;
}

int ExpertLayout::tensor_index(const std::string& name) const {
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].name == name) return static_cast<int>(i);
  }
  EF_CHECK(false, "the expert layout has no tensor named '" << name << "'");
}

ExpertPool::ExpertPool(std::shared_ptr<Backend> backend, std::vector<int> num_experts,
                       std::vector<ExpertLayout> layer_layouts)
    : backend_(std::move(backend)), num_experts_(std::move(num_experts)), layouts_(std::move(layer_layouts)) {
  EF_CHECK(!num_experts_.empty(), "an expert pool needs at least one MoE layer");
  EF_CHECK(num_experts_.size() == layouts_.size(), "got " << num_experts_.size() << " expert counts but "
                                                          << layouts_.size() << " layer layouts");
  size_t total = 0;
  for (size_t l = 0; l < num_experts_.size(); ++l) {
    EF_CHECK(num_experts_[l] > 0, "layer " << l << " has " << num_experts_[l] << " experts; need at least one");
    EF_CHECK(layouts_[l].expert_bytes > 0, "layer " << l << " has an empty expert layout");
    layer_offsets_.push_back(total);
    total += layouts_[l].expert_bytes * static_cast<size_t>(num_experts_[l]);
    max_expert_bytes_ = std::max(max_expert_bytes_, layouts_[l].expert_bytes);
  }
  arena_ = std::make_shared<Buffer>(backend_, Buffer::Kind::kPinned, total);
}

void ExpertPool::check_expert(int layer, int expert) const {
  EF_CHECK(layer >= 0 && layer < num_layers(), "unknown layer " << layer << " (expert " << expert
                                                                << "): the pool has layers 0.." << num_layers() - 1);
  EF_CHECK(expert >= 0 && expert < num_experts_[layer],
           "unknown expert " << expert << " of layer " << layer << ": that layer has experts 0.."
                             << num_experts_[layer] - 1);
}

int ExpertPool::num_experts(int layer) const {
  EF_CHECK(layer >= 0 && layer < num_layers(), "unknown layer " << layer << ": the pool has layers 0.." << num_layers() - 1);
  return num_experts_[layer];
}

const ExpertLayout& ExpertPool::layout(int layer) const {
  EF_CHECK(layer >= 0 && layer < num_layers(), "unknown layer " << layer << ": the pool has layers 0.." << num_layers() - 1);
  return layouts_[layer];
}

const uint8_t* ExpertPool::expert_data(int layer, int expert) const {
  check_expert(layer, expert);
  return arena_->data() + layer_offsets_[layer] + layouts_[layer].expert_bytes * static_cast<size_t>(expert);
}

void ExpertPool::write(int layer, int expert, int tensor, const void* src, size_t bytes, size_t offset) {
  check_expert(layer, expert);
  const auto& tensors = layouts_[layer].tensors;
  EF_CHECK(tensor >= 0 && tensor < static_cast<int>(tensors.size()),
           "tensor index " << tensor << " is out of range: layer " << layer << " experts have " << tensors.size() << " tensors");
  const TensorSpec& spec = tensors[tensor];
  EF_CHECK(offset <= spec.nbytes && bytes <= spec.nbytes - offset,
           "writing " << bytes << " bytes at offset " << offset << " overruns tensor '" << spec.name << "' of layer "
                      << layer << " expert " << expert << " (" << spec.nbytes << " bytes)");
  std::memcpy(const_cast<uint8_t*>(expert_data(layer, expert)) + spec.offset + offset, src, bytes);
}

}  // namespace expertflow
