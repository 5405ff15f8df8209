// ExpertPool: packing of expert layouts and the pinned arena. See include/expertflow/pool.h.
#include "expertflow/pool.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <set>
#include <utility>

#include "expertflow/error.h"

namespace expertflow {

Buffer::Buffer(std::shared_ptr<Backend> backend, Kind kind, size_t bytes)
    : backend_(std::move(backend)), kind_(kind), bytes_(bytes) {
  data_ = static_cast<uint8_t*>(kind == Kind::kPinned ? backend_->alloc_pinned(bytes) : backend_->alloc_device(bytes));
}

namespace {

// The page before a shared arena. (Its size is checked against the file's before it is mapped.)
struct SharedHeader {
  char magic[8];
  uint64_t layout_tag;
};
constexpr char kSharedMagic[8] = {'E', 'F', 'P', 'O', 'O', 'L', '0', '2'};
constexpr size_t kSharedHeaderBytes = 4096;  // a page: the arena stays page- and 256-byte aligned

// A descriptor closed on scope exit unless released: every error below throws through it.
class FdGuard {
 public:
  explicit FdGuard(int fd) : fd_(fd) {}
  ~FdGuard() {
    if (fd_ >= 0) close(fd_);
  }
  FdGuard(const FdGuard&) = delete;
  FdGuard& operator=(const FdGuard&) = delete;
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

// A mapping unmapped on scope exit unless released.
class MappingGuard {
 public:
  MappingGuard(void* data, size_t bytes) : data_(data), bytes_(bytes) {}
  ~MappingGuard() {
    if (data_) munmap(data_, bytes_);
  }
  MappingGuard(const MappingGuard&) = delete;
  MappingGuard& operator=(const MappingGuard&) = delete;
  void* release() { return std::exchange(data_, nullptr); }

 private:
  void* data_;
  size_t bytes_;
};

}  // namespace

Buffer::Buffer(std::shared_ptr<Backend> backend, size_t bytes, const std::string& attach_path, uint64_t layout_tag)
    : backend_(std::move(backend)), kind_(Kind::kShared), bytes_(bytes) {
  EF_CHECK(bytes > 0, "a shared arena needs at least one byte");
  const size_t total = bytes + kSharedHeaderBytes;
  const bool create = attach_path.empty();
  // An anonymous shared-memory file: unlike a /dev/shm name it is bounded by memory alone, not by
  // the mount's size, and it cannot outlive the processes that hold it.
  FdGuard fd(create ? memfd_create("expertflow-pool", MFD_CLOEXEC) : open(attach_path.c_str(), O_RDWR | O_CLOEXEC));
  const int open_errno = errno;  // saved before anything else can change it
  if (create) {
    EF_CHECK(fd.get() >= 0, "could not create a shared-memory file: " << std::strerror(open_errno));
    const int sized = ftruncate(fd.get(), static_cast<off_t>(total));
    const int size_errno = errno;
    EF_CHECK(sized == 0, "could not size a shared-memory file to " << total << " bytes: " << std::strerror(size_errno));
  } else {
    EF_CHECK(fd.get() >= 0, "could not open the shared expert pool at " << attach_path << ": " << std::strerror(open_errno)
                                                                        << " (is the process that created it still running?)");
    struct stat st {};
    const int statted = fstat(fd.get(), &st);
    const int stat_errno = errno;
    EF_CHECK(statted == 0, "could not read the size of the shared expert pool at " << attach_path << ": "
                                                                                   << std::strerror(stat_errno));
    EF_CHECK(S_ISREG(st.st_mode) && static_cast<size_t>(st.st_size) == total,
             attach_path << " is not a shared expert pool of this layout (it holds " << st.st_size << " bytes; this pool needs "
                         << total << "): both processes must load the same model");
  }
  void* data = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  const int map_errno = errno;
  EF_CHECK(data != MAP_FAILED, "could not map " << total << " bytes of shared host memory: " << std::strerror(map_errno));
  MappingGuard mapping(data, total);
  auto* header = static_cast<SharedHeader*>(data);
  if (create) {
    std::memcpy(header->magic, kSharedMagic, sizeof(kSharedMagic));
    header->layout_tag = layout_tag;
  } else {
    const bool pool = std::memcmp(header->magic, kSharedMagic, sizeof(kSharedMagic)) == 0;
    EF_CHECK(pool && header->layout_tag == layout_tag,
             attach_path << (pool ? " is a shared expert pool of other layouts" : " is not a shared expert pool")
                         << ": both processes must load the same model");
  }
  // The creator keeps its descriptor: the /proc path other processes attach through names it. An
  // attached mapping stays valid without its descriptor.
  if (create) shared_path_ = "/proc/" + std::to_string(getpid()) + "/fd/" + std::to_string(fd.get());
  data_ = static_cast<uint8_t*>(data) + kSharedHeaderBytes;
  backend_->register_host(data_, bytes_);
  mapping_ = static_cast<uint8_t*>(mapping.release());
  mapping_bytes_ = total;
  if (create) fd_ = fd.release();
}

Buffer::~Buffer() {
  if (kind_ == Kind::kPinned) {
    backend_->free_pinned(data_);
  } else if (kind_ == Kind::kShared) {
    backend_->unregister_host(data_);
    munmap(mapping_, mapping_bytes_);
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
  arena_ = shared ? std::make_shared<Buffer>(backend_, total, attach_path, layout_tag())
                  : std::make_shared<Buffer>(backend_, Buffer::Kind::kPinned, total);
}

uint64_t ExpertPool::layout_tag() const {
  // FNV-1a over every layer's expert count and tensors (name, dtype, shape, offset).
  uint64_t hash = 1469598103934665603ull;
  auto mix = [&hash](const std::string& text) {
    for (unsigned char c : text) hash = (hash ^ c) * 1099511628211ull;
  };
  for (size_t l = 0; l < layouts_.size(); ++l) {
    mix("layer " + std::to_string(num_experts_[l]) + ";");
    for (const auto& t : layouts_[l].tensors) {
      mix(t.name + ":" + t.dtype + ":" + std::to_string(t.offset));
      for (int64_t d : t.shape) mix("," + std::to_string(d));
      mix(";");
    }
  }
  return hash;
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
