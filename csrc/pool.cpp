// ExpertPool: packing of expert layouts and the pinned arena. See include/expertflow/pool.h.
#include "expertflow/pool.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <set>

#include "expertflow/error.h"

namespace expertflow {

Buffer::Buffer(std::shared_ptr<Backend> backend, Kind kind, size_t bytes)
    : backend_(std::move(backend)), kind_(kind), bytes_(bytes) {
  data_ = static_cast<uint8_t*>(kind == Kind::kPinned ? backend_->alloc_pinned(bytes) : backend_->alloc_device(bytes));
}

Buffer::Buffer(std::shared_ptr<Backend> backend, size_t bytes, const std::string& attach_path)
    : backend_(std::move(backend)), kind_(Kind::kShared), bytes_(bytes) {
  EF_CHECK(bytes > 0, "a shared arena needs at least one byte");
  int fd = -1;
  if (attach_path.empty()) {
    // An anonymous shared-memory file: unlike a /dev/shm name it is bounded by memory alone, not by
    // the mount's size, and it cannot outlive the processes that hold it.
    fd = memfd_create("expertflow-pool", MFD_CLOEXEC);
    const int create_errno = errno;  // saved before anything else can change it
    EF_CHECK(fd >= 0, "could not create a shared-memory file: " << std::strerror(create_errno));
    if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
      const int err = errno;
      close(fd);
      EF_CHECK(false, "could not size a shared-memory file to " << bytes << " bytes: " << std::strerror(err));
    }
    fd_ = fd;
    shared_path_ = "/proc/" + std::to_string(getpid()) + "/fd/" + std::to_string(fd);
  } else {
    fd = open(attach_path.c_str(), O_RDWR | O_CLOEXEC);
    const int open_errno = errno;
    EF_CHECK(fd >= 0, "could not open the shared expert pool at " << attach_path << ": " << std::strerror(open_errno)
                                                                  << " (is the process that created it still running?)");
    struct stat st {};
    if (fstat(fd, &st) != 0) {
      const int stat_errno = errno;
      close(fd);
      EF_CHECK(false, "could not read the size of the shared expert pool at " << attach_path << ": " << std::strerror(stat_errno));
    }
    if (static_cast<size_t>(st.st_size) != bytes) {
      close(fd);
      EF_CHECK(false, "the shared expert pool at " << attach_path << " holds " << st.st_size << " bytes, but this pool's "
                                                   << "layout needs " << bytes << ": both processes must describe the same model");
    }
  }
  void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int map_errno = errno;
  if (fd_ < 0) close(fd);  // an attached mapping stays valid without its descriptor
  if (data == MAP_FAILED) {
    if (fd_ >= 0) close(fd_);
    EF_CHECK(false, "could not map " << bytes << " bytes of shared host memory: " << std::strerror(map_errno));
  }
  data_ = static_cast<uint8_t*>(data);
  try {
    backend_->register_host(data_, bytes_);
  } catch (...) {
    munmap(data_, bytes_);
    if (fd_ >= 0) close(fd_);
    throw;
  }
}

Buffer::~Buffer() {
  if (kind_ == Kind::kPinned) {
    backend_->free_pinned(data_);
  } else if (kind_ == Kind::kShared) {
    backend_->unregister_host(data_);
    munmap(data_, bytes_);
    if (fd_ >= 0) close(fd_);
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
                       std::vector<ExpertLayout> layer_layouts, bool shared, const std::string& attach_path)
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
  EF_CHECK(shared || attach_path.empty(), "attach_path applies to shared pools only");
  arena_ = shared ? std::make_shared<Buffer>(backend_, total, attach_path)
                  : std::make_shared<Buffer>(backend_, Buffer::Kind::kPinned, total);
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
