// Python bindings: the only file that knows Python.
//
// Invariants:
// - Arguments are checked by the native classes; this file converts types, releases the GIL around
//   anything that may block, and maps expertflow::Error to expertflow.ExpertFlowError.
// - Arenas are handed out as one-dimensional uint8 DLPack tensors that own a reference to the arena,
//   so views stay valid after the pool or cache object is closed or collected.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "dlpack.h"
#include "expertflow/backend.h"
#include "expertflow/cache.h"
#include "expertflow/error.h"
#include "expertflow/expand.h"
#include "expertflow/host_linear.h"
#include "expertflow/policy.h"
#include "expertflow/pool.h"
#include "expertflow/runtime.h"

namespace py = pybind11;
using namespace expertflow;

namespace {

struct ArenaView {
  std::shared_ptr<Buffer> buffer;
  int64_t shape[1];
  DLManagedTensor managed;
};

py::capsule arena_dlpack(const std::shared_ptr<Buffer>& buffer) {
  EF_CHECK(buffer != nullptr, "the arena was released");
  auto* view = new ArenaView{buffer, {static_cast<int64_t>(buffer->bytes())}, {}};
  DLTensor& t = view->managed.dl_tensor;
  t.data = buffer->data();
  const bool on_gpu = buffer->kind() == Buffer::Kind::kDevice && buffer->backend()->is_gpu();
  t.device = on_gpu ? DLDevice{kDLCUDA, buffer->backend()->device_index()} : DLDevice{kDLCPU, 0};
  t.ndim = 1;
  t.dtype = DLDataType{kDLUInt, 8, 1};
  t.shape = view->shape;
  t.strides = nullptr;
  t.byte_offset = 0;
  view->managed.manager_ctx = view;
  view->managed.deleter = [](DLManagedTensor* self) { delete static_cast<ArenaView*>(self->manager_ctx); };
  return py::capsule(&view->managed, "dltensor", [](PyObject* capsule) {
    // A consumer renames the capsule to "used_dltensor" and owns it; otherwise we free it here.
    if (PyCapsule_IsValid(capsule, "dltensor")) {
      auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
      managed->deleter(managed);
    } else {
      PyErr_Clear();
    }
  });
}

// A compute stream handle from Python. The host backend computes on the calling thread: it takes only
// 0, never an address (a wrong one would be dereferenced). On CUDA a handle is a cudaStream_t that the
// Python layer took from a torch.cuda.Stream.
Stream compute_stream(const Runtime& r, uintptr_t handle) {
  EF_CHECK(handle == 0 || r.backend()->is_gpu(),
           "the host backend computes on the calling thread: pass stream=None (0), not a stream handle");
  return reinterpret_cast<Stream>(handle);
}

py::dict stats_dict(const RuntimeStats& s) {
  py::dict d;
  d["accesses"] = s.accesses;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["prefetch_hits"] = s.prefetch_hits;
  d["prefetches"] = s.prefetches;
  d["wasted_prefetches"] = s.wasted_prefetches;
  d["cancelled_prefetches"] = s.cancelled_prefetches;
  d["backfills"] = s.backfills;
  d["cancelled_backfills"] = s.cancelled_backfills;
  d["evictions"] = s.evictions;
  d["bytes_copied"] = s.bytes_copied;
  d["prefetch_bytes"] = s.prefetch_bytes;
  d["demand_bytes"] = s.demand_bytes;
  d["stalls"] = s.stalls;
  d["stall_ms"] = s.stall_ms;
  d["timed_demand_bytes"] = s.timed_demand_bytes;
  d["demand_ms"] = s.demand_ms;
  return d;
}

py::dict slot_dict(const SlotMeta& m) {
  py::dict d;
  d["layer"] = m.layer;
  d["expert"] = m.expert;
  d["pin_count"] = m.pin_count;
  d["planned"] = m.planned;
  d["last_position"] = m.last_position;
  d["next_use"] = m.next_use;
  d["following_use"] = m.following_use;
  d["last_use"] = m.last_use;
  d["use_count"] = m.use_count;
  d["prefetched_unused"] = m.prefetched_unused;
  d["backfilled"] = m.backfilled;
  return d;
}

using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using BoolArray = py::array_t<bool, py::array::c_style | py::array::forcecast>;
using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

// A plan from arrays: prefetch entries (layers, experts, due: [n] each) and, optionally, next-use
// tables [num_layers, stride] (both or neither).
Plan make_plan(const IntArray& layers, const IntArray& experts, const DoubleArray& due,
               const std::optional<DoubleArray>& next_use, const std::optional<DoubleArray>& following_use,
               double now, const std::optional<BoolArray>& sure) {
  EF_CHECK(layers.ndim() == 1 && experts.ndim() == 1 && due.ndim() == 1 && layers.size() == experts.size() &&
               layers.size() == due.size(),
           "plan entries need three 1-D arrays of one length (layers, experts, due), got sizes "
               << layers.size() << ", " << experts.size() << " and " << due.size());
  EF_CHECK(next_use.has_value() == following_use.has_value(), "give both next-use tables or neither");
  EF_CHECK(!sure || (sure->ndim() == 1 && sure->size() == layers.size()),
           "`sure` needs one flag per plan entry (" << layers.size() << ")");
  Plan plan;
  const auto l = layers.unchecked<1>();
  const auto e = experts.unchecked<1>();
  const auto d = due.unchecked<1>();
  plan.prefetch.reserve(static_cast<size_t>(layers.size()));
  for (py::ssize_t i = 0; i < layers.size(); ++i) {
    plan.prefetch.push_back(PlanItem{l(i), e(i), d(i), sure ? sure->at(i) : true});
  }
  if (next_use) {
    EF_CHECK(next_use->ndim() == 2 && following_use->ndim() == 2 && next_use->shape(0) == following_use->shape(0) &&
                 next_use->shape(1) == following_use->shape(1),
             "next-use tables must be two [num_layers, num_experts] arrays of one shape");
    plan.stride = static_cast<int>(next_use->shape(1));
    plan.next_use.assign(next_use->data(), next_use->data() + next_use->size());
    plan.following_use.assign(following_use->data(), following_use->data() + following_use->size());
  }
  plan.now = now;
  return plan;
}

StoredFormat stored_format(const std::string& format) {
  if (format == "fp8") return StoredFormat::kFp8Block;
  if (format == "int8") return StoredFormat::kInt8Row;
  if (format == "mxfp4") return StoredFormat::kMxfp4;
  throw Error("expansion: format must be fp8, int8 or mxfp4, got '" + format + "'");
}

DenseType dense_type(const std::string& dtype) {
  if (dtype == "bfloat16") return DenseType::kBf16;
  if (dtype == "float16") return DenseType::kFp16;
  if (dtype == "float32") return DenseType::kFp32;
  throw Error("expansion: dtype must be bfloat16, float16 or float32, got '" + dtype + "'");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ExpertFlow native runtime: pinned expert pool, slot cache, copy engine.";
  py::register_exception<Error>(m, "ExpertFlowError", PyExc_RuntimeError);
  m.attr("TENSOR_ALIGNMENT") = kTensorAlignment;
  m.attr("BACKFILL_NOT_ADMITTED") = static_cast<int>(BackfillOutcome::kNotAdmitted);
  m.attr("BACKFILL_QUEUED") = static_cast<int>(BackfillOutcome::kQueued);
  m.attr("BACKFILL_HELD") = static_cast<int>(BackfillOutcome::kHeld);
  m.attr("BACKFILL_MAX_PENDING_PREFETCHES") = kBackfillMaxPendingPrefetches;
  m.def("cuda_unavailable_reason", &cuda_unavailable_reason,
        "Empty when a CUDA device is usable by this build; otherwise the reason.");

  using Table = py::array_t<double, py::array::c_style | py::array::forcecast>;
  m.def(
      "kept_until_next_use",
      [](const Table& next_use, const Table& following_use, int layer, double visit, const std::vector<int>& experts,
         int num_slots) {
        EF_CHECK(next_use.ndim() == 2 && following_use.ndim() == 2 && next_use.shape(0) == following_use.shape(0) &&
                     next_use.shape(1) == following_use.shape(1),
                 "next_use and following_use must be [num_layers, num_experts] tables of one shape");
        py::array_t<double> kept(static_cast<py::ssize_t>(experts.size()));
        kept_until_next_use(next_use.data(), following_use.data(), static_cast<int>(next_use.shape(0)),
                            static_cast<int>(next_use.shape(1)), layer, visit, experts.data(),
                            static_cast<int>(experts.size()), num_slots, kept.mutable_data());
        return kept;
      },
      py::arg("next_use"), py::arg("following_use"), py::arg("layer"), py::arg("visit"), py::arg("experts"),
      py::arg("num_slots"), "[m] float64: whether Belady's cache keeps each expert until its next use (policy.h).");
  m.def("expand_kernels_available", &expand_kernels_available,
        "True when this build has the GPU expansion kernels of compressed experts.");
  m.def(
      "expand_weight",
      [](const std::string& format, const std::string& dtype, uintptr_t codes, uintptr_t scales, uintptr_t out,
         int64_t rows, int64_t cols, bool transposed, int device, uintptr_t stream) {
        ExpandArgs args;
        args.format = stored_format(format);
        args.dtype = dense_type(dtype);
        args.codes = reinterpret_cast<const void*>(codes);
        args.scales = reinterpret_cast<const void*>(scales);
        args.out = reinterpret_cast<void*>(out);
        args.rows = rows;
        args.cols = cols;
        args.transposed = transposed;
        args.device = device;
        args.stream = reinterpret_cast<void*>(stream);
        expand_weight(args);
      },
      py::arg("format"), py::arg("dtype"), py::arg("codes"), py::arg("scales"), py::arg("out"), py::arg("rows"),
      py::arg("cols"), py::arg("transposed"), py::arg("device"), py::arg("stream"),
      "Expands a compressed weight [rows, cols] (device pointers) into `out` on `stream` (expand.h).");
  py::class_<ExpertExpansion>(m, "ExpertExpansion",
                              "One expert's weights expanded in one call from its packed bytes (expand.h).")
      .def(py::init([](const std::string& format, const std::string& dtype,
                       const std::vector<std::tuple<int64_t, int64_t, uintptr_t, int64_t, int64_t, bool>>& weights,
                       int device) {
             std::vector<PackedWeight> packed;
             for (const auto& [codes_offset, scales_offset, out, rows, cols, transposed] : weights) {
               packed.push_back(PackedWeight{stored_format(format), dense_type(dtype), codes_offset, scales_offset,
                                             reinterpret_cast<void*>(out), rows, cols, transposed});
             }
             return std::make_unique<ExpertExpansion>(std::move(packed), device);
           }),
           py::arg("format"), py::arg("dtype"), py::arg("weights"), py::arg("device"),
           "weights: (codes offset, scales offset, output address, rows, cols, transposed) per weight.")
      .def(
          "run",
          [](const ExpertExpansion& self, uintptr_t base, uintptr_t stream) {
            self.run(reinterpret_cast<const void*>(base), reinterpret_cast<void*>(stream));
          },
          py::arg("base"), py::arg("stream"));

  py::class_<HostSignal, std::shared_ptr<HostSignal>>(m, "HostSignal",
                                                    "A flag the host sets once, which a stream can wait for.")
      .def(py::init<>())
      .def("set", &HostSignal::set, "Sets the flag: the streams waiting for it move on.")
      .def("is_set", &HostSignal::is_set);
  py::class_<HostLinear>(m, "HostLinear", "A bf16 linear layer on the host's cores (host_linear.h).")
      .def(py::init([](int num_threads, const std::string& isa) {
             HostIsa limit = HostIsa::kAvx512Bf16;
             if (isa == "avx512") {
               limit = HostIsa::kAvx512;
             } else if (isa == "portable") {
               limit = HostIsa::kPortable;
             } else {
               EF_CHECK(isa == "best", "isa must be best, avx512 or portable, got '" << isa << "'");
             }
             return std::make_unique<HostLinear>(num_threads, limit);
           }),
           py::arg("num_threads"), py::arg("isa") = "best",
           "isa: the best kernel to allow (the CPU may offer less).")
      .def_property_readonly("num_threads", &HostLinear::num_threads)
      .def_property_readonly("isa", [](const HostLinear& self) { return host_isa_name(self.isa()); })
      .def(
          "linear_bf16",
          [](HostLinear& self, uintptr_t x, uintptr_t w, uintptr_t y, int64_t n, int64_t in, int64_t out) {
            self.linear_bf16(reinterpret_cast<const uint16_t*>(x), reinterpret_cast<const uint16_t*>(w),
                             reinterpret_cast<uint16_t*>(y), n, in, out);
          },
          py::arg("x"), py::arg("w"), py::arg("y"), py::arg("n"), py::arg("in_features"), py::arg("out_features"),
          py::call_guard<py::gil_scoped_release>(),
          "y [n, out] = x [n, in] . w [out, in]^T; host addresses of contiguous bf16 tensors.")
      .def(
          "gated_silu_expert_bf16",
          [](HostLinear& self, uintptr_t x, uintptr_t gate_up, uintptr_t down, uintptr_t y, uintptr_t scratch, int64_t n,
             int64_t hidden, int64_t inter, const std::shared_ptr<HostSignal>& done) {
            self.gated_silu_expert_bf16(reinterpret_cast<const uint16_t*>(x), reinterpret_cast<const uint16_t*>(gate_up),
                                        reinterpret_cast<const uint16_t*>(down), reinterpret_cast<uint16_t*>(y),
                                        reinterpret_cast<uint16_t*>(scratch), n, hidden, inter, done.get());
          },
          py::arg("x"), py::arg("gate_up"), py::arg("down"), py::arg("y"), py::arg("scratch"), py::arg("n"),
          py::arg("hidden"), py::arg("inter"), py::arg("done") = py::none(), py::call_guard<py::gil_scoped_release>(),
          "y [n, hidden] = (silu(g) * u) . down^T, [g | u] = x . gate_up^T; host addresses of contiguous bf16 "
          "tensors (gate_up [2 * inter, hidden], down [hidden, inter], scratch of 3 * n * inter values); `done` "
          "(a HostSignal) is set once y is written.")
      .def("close", &HostLinear::close, py::call_guard<py::gil_scoped_release>(), "Joins the workers.");

  py::class_<Backend, std::shared_ptr<Backend>>(m, "Backend")
      .def_property_readonly("name", &Backend::name)
      .def_property_readonly("is_gpu", &Backend::is_gpu)
      .def_property_readonly("device_index", &Backend::device_index);
  m.def("make_backend", &make_backend, py::arg("name"), py::arg("device_index") = 0);

  py::class_<ExpertPool, std::shared_ptr<ExpertPool>>(m, "ExpertPool")
      .def(py::init([](std::shared_ptr<Backend> backend, std::vector<int> num_experts,
                       std::vector<std::vector<py::tuple>> layer_tensors, bool shared, const std::string& attach_path) {
             std::vector<ExpertLayout> layouts;
             for (const auto& tensors : layer_tensors) {
               std::vector<TensorSpec> specs;
               for (const auto& t : tensors) {
                 EF_CHECK(t.size() == 4, "a tensor spec is (name, dtype, shape, itemsize), got " << t.size() << " fields");
                 TensorSpec spec;
                 spec.name = t[0].cast<std::string>();
                 spec.dtype = t[1].cast<std::string>();
                 spec.shape = t[2].cast<std::vector<int64_t>>();
                 spec.itemsize = t[3].cast<size_t>();
                 specs.push_back(std::move(spec));
               }
               layouts.push_back(ExpertLayout::pack(std::move(specs)));
             }
             return std::make_shared<ExpertPool>(std::move(backend), std::move(num_experts), std::move(layouts), shared,
                                                 attach_path);
           }),
           py::arg("backend"), py::arg("num_experts"), py::arg("layer_tensors"), py::arg("shared") = false,
           py::arg("attach_path") = "")
      .def_property_readonly("shared_path", &ExpertPool::shared_path)
      .def_property_readonly("num_layers", &ExpertPool::num_layers)
      .def_property_readonly("total_bytes", &ExpertPool::total_bytes)
      .def_property_readonly("max_expert_bytes", &ExpertPool::max_expert_bytes)
      .def_property_readonly("backend", &ExpertPool::backend)
      .def("num_experts", &ExpertPool::num_experts, py::arg("layer"))
      .def("expert_bytes", &ExpertPool::expert_bytes, py::arg("layer"))
      .def("expert_offset",
           [](const ExpertPool& p, int layer, int expert) {
             return static_cast<size_t>(p.expert_data(layer, expert) - p.arena()->data());
           },
           py::arg("layer"), py::arg("expert"), "Byte offset of the expert in the pinned arena.")
      .def("layout",
           [](const ExpertPool& p, int layer) {
             py::list out;
             for (const auto& t : p.layout(layer).tensors) {
               out.append(py::make_tuple(t.name, t.dtype, t.shape, t.itemsize, t.offset, t.nbytes));
             }
             return out;
           },
           py::arg("layer"), "[(name, dtype, shape, itemsize, offset, nbytes)] of every expert of the layer.")
      .def("write",
           [](ExpertPool& p, int layer, int expert, int tensor, py::buffer data, size_t offset) {
             py::buffer_info info = data.request();
             EF_CHECK(PyBuffer_IsContiguous(info.view(), 'C'),
                      "the source of layer " << layer << " expert " << expert
                                             << " is not contiguous; make it contiguous first");
             const size_t bytes = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
             py::gil_scoped_release nogil;
             p.write(layer, expert, tensor, info.ptr, bytes, offset);
           },
           py::arg("layer"), py::arg("expert"), py::arg("tensor"), py::arg("data"), py::arg("offset") = 0,
           "Copies a contiguous buffer (numpy array, memoryview of an mmap) into one tensor of an expert.")
      .def("arena_dlpack", [](const ExpertPool& p) { return arena_dlpack(p.arena()); },
           "The whole pinned arena as a uint8 DLPack capsule.");

  py::class_<SlotCache>(m, "SlotCache")
      .def(py::init([](int num_slots, const std::string& policy, int num_layers) {
             return SlotCache(num_slots, parse_policy(policy), num_layers);
           }),
           py::arg("num_slots"), py::arg("policy"), py::arg("num_layers") = 0)
      .def_property_readonly("position", &SlotCache::position)
      .def_property_readonly("num_slots", &SlotCache::num_slots)
      .def("find", &SlotCache::find, py::arg("layer"), py::arg("expert"))
      .def("clear", &SlotCache::clear, py::arg("slot"))
      .def("layer_count", &SlotCache::layer_count, py::arg("layer"))
      .def("set_layer_quotas", &SlotCache::set_layer_quotas, py::arg("quotas"))
      .def("access",
           [](SlotCache& c, int layer, const std::vector<int>& experts, std::optional<std::vector<double>> next_uses) {
             const AccessResult r = c.access(layer, experts, next_uses ? &*next_uses : nullptr);
             return py::make_tuple(r.hits, r.prefetch_hits, r.evictions, r.wasted_evictions);
           },
           py::arg("layer"), py::arg("experts"), py::arg("next_uses") = py::none(),
           "Demand-paging access of one layer's experts: (hits, prefetch_hits, evictions, wasted_evictions).")
      .def("apply_plan",
           [](SlotCache& c, const IntArray& layers, const IntArray& experts, const DoubleArray& due,
              std::optional<DoubleArray> next_use, std::optional<DoubleArray> following_use, double now,
              std::optional<BoolArray> sure, bool link_idle) {
             const Plan plan = make_plan(layers, experts, due, next_use, following_use, now, sure);
             std::vector<std::pair<bool, bool>> evicted;  // (occupied, prefetched and unused) per load
             const std::vector<PlanLoad> loads = c.apply_plan(
                 plan,
                 [&](int slot) {
                   const SlotMeta& m = c.slot(slot);
                   evicted.emplace_back(!m.empty(), m.prefetched_unused);
                 },
                 nullptr, nullptr, link_idle);
             py::list out;
             for (size_t i = 0; i < loads.size(); ++i) {
               const SlotMeta& m = c.slot(loads[i].slot);
               out.append(py::make_tuple(m.layer, m.expert, loads[i].due, evicted[i].first, evicted[i].second));
             }
             return out;
           },
           py::arg("layers"), py::arg("experts"), py::arg("due"), py::arg("next_use") = py::none(),
           py::arg("following_use") = py::none(), py::arg("now") = kDueNow, py::arg("sure") = py::none(),
           py::arg("link_idle") = false,
           "Applies a plan -> loads as [(layer, expert, due, evicted, evicted_was_unused_prefetch)].")
      .def("readmit",
           [](SlotCache& c, bool link_idle) {
             std::vector<std::pair<bool, bool>> evicted;
             const std::vector<PlanLoad> loads = c.readmit(
                 [&](int slot) {
                   const SlotMeta& m = c.slot(slot);
                   evicted.emplace_back(!m.empty(), m.prefetched_unused);
                 },
                 nullptr, link_idle);
             py::list out;
             for (size_t i = 0; i < loads.size(); ++i) {
               const SlotMeta& m = c.slot(loads[i].slot);
               out.append(py::make_tuple(m.layer, m.expert, loads[i].due, evicted[i].first, evicted[i].second));
             }
             return out;
           },
           py::arg("link_idle") = false,
           "Admits what the plan still holds after the clock moved -> loads as in apply_plan.")
      .def("slot_table",
           [](const SlotCache& c) {
             py::list out;
             for (const auto& s : c.slots()) out.append(slot_dict(s));
             return out;
           })
      .def("resident", [](const SlotCache& c) {
        py::list out;
        for (const auto& s : c.slots()) out.append(py::make_tuple(s.layer, s.expert));
        return out;
      });

  py::class_<Runtime, std::shared_ptr<Runtime>>(m, "Runtime")
      .def(py::init([](std::shared_ptr<ExpertPool> pool, int num_slots, size_t slot_bytes, const std::string& policy,
                       size_t chunk_bytes, int max_chunks_in_flight) {
             RuntimeOptions options;
             options.num_slots = num_slots;
             options.slot_bytes = slot_bytes;
             options.policy = policy;
             options.copy.chunk_bytes = chunk_bytes;
             options.copy.max_chunks_in_flight = max_chunks_in_flight;
             return std::make_shared<Runtime>(std::move(pool), options);
           }),
           py::arg("pool"), py::arg("num_slots"), py::arg("slot_bytes") = 0, py::arg("policy") = "lru",
           py::arg("chunk_bytes") = size_t{8} << 20, py::arg("max_chunks_in_flight") = 2)
      .def_property_readonly("num_slots", &Runtime::num_slots)
      .def_property_readonly("slot_bytes", &Runtime::slot_bytes)
      .def_property_readonly("policy", [](const Runtime& r) { return policy_name(r.policy()); })
      .def("apply_plan",
           [](Runtime& r, const IntArray& layers, const IntArray& experts, const DoubleArray& due,
              std::optional<DoubleArray> next_use, std::optional<DoubleArray> following_use, double now,
              std::optional<BoolArray> sure) {
             const Plan plan = make_plan(layers, experts, due, next_use, following_use, now, sure);
             py::gil_scoped_release nogil;
             r.apply_plan(plan);
           },
           py::arg("layers"), py::arg("experts"), py::arg("due"), py::arg("next_use") = py::none(),
           py::arg("following_use") = py::none(), py::arg("now") = kDueNow, py::arg("sure") = py::none(),
           "Replaces the plan: prefetch entries (layers, experts, due; `sure`: false loads only on an idle "
           "link), optional next-use tables [L, E] and the position of the next access.")
      .def("acquire",
           [](Runtime& r, int layer, const std::vector<int>& experts, uintptr_t stream, bool wait,
              const std::vector<int>& spare) {
             const Stream compute = compute_stream(r, stream);
             py::gil_scoped_release nogil;
             return r.acquire(layer, experts, compute, wait, spare);
           },
           py::arg("layer"), py::arg("experts"), py::arg("stream") = 0, py::arg("wait") = true,
           py::arg("spare") = std::vector<int>{})
      .def("wait_ready",
           [](Runtime& r, int slot, uintptr_t stream) {
             const Stream compute = compute_stream(r, stream);
             py::gil_scoped_release nogil;
             r.wait_ready(slot, compute);
           },
           py::arg("slot"), py::arg("stream") = 0)
      .def(
          "wait_signal",
          [](Runtime& r, std::shared_ptr<HostSignal> signal, uintptr_t stream) {
            r.wait_signal(std::move(signal), compute_stream(r, stream));
          },
          py::arg("signal"), py::arg("stream") = 0,
          "Makes the stream wait until the signal is set; the caller does not wait (host backend, stream 0: "
          "the caller waits).")
      .def("is_ready", &Runtime::is_ready, py::arg("slot"))
      .def("release",
           [](Runtime& r, int layer, const std::vector<int>& experts, uintptr_t stream) {
             const Stream compute = compute_stream(r, stream);
             py::gil_scoped_release nogil;
             r.release(layer, experts, compute);
           },
           py::arg("layer"), py::arg("experts"), py::arg("stream") = 0)
      .def("set_layer_quotas", &Runtime::set_layer_quotas, py::arg("quotas"))
      .def("stats", [](Runtime& r) { return stats_dict(r.stats()); })
      .def("reset_stats", &Runtime::reset_stats)
      .def("resident", &Runtime::resident, py::arg("layer"), py::arg("experts"))
      .def("landed", &Runtime::landed, py::arg("layer"), py::arg("experts"))
      .def("bytes_to_submit", &Runtime::bytes_to_submit, py::arg("layer"), py::arg("experts"))
      .def("backfill", &Runtime::backfill, py::arg("layer"), py::arg("experts"))
      .def("slot_table",
           [](Runtime& r) {
             py::list out;
             for (const auto& s : r.slot_table()) out.append(slot_dict(s));
             return out;
           })
      .def("occupied",
           [](Runtime& r) {
             const std::vector<SlotMeta> slots = r.slot_table();
             IntArray out({static_cast<py::ssize_t>(slots.size()), py::ssize_t{2}});
             auto view = out.mutable_unchecked<2>();
             for (size_t i = 0; i < slots.size(); ++i) {
               view(i, 0) = slots[i].layer;
               view(i, 1) = slots[i].expert;
             }
             return out;
           },
           "[num_slots, 2] int32: each slot's (layer, expert), -1 when empty.")
      .def("synchronize", &Runtime::synchronize, py::call_guard<py::gil_scoped_release>())
      .def("pause_prefetch", &Runtime::pause_prefetch)
      .def("resume_prefetch", &Runtime::resume_prefetch)
      .def("close", &Runtime::close, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("closed", &Runtime::closed)
      .def("arena_dlpack",
           [](Runtime& r) {
             EF_CHECK(!r.closed(), "the expert cache is closed; create a new one");
             return arena_dlpack(r.arena());
           },
           "The slot arena (num_slots * slot_bytes) as a uint8 DLPack capsule on the backend's device.");
}
