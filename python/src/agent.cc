#include "python/src/agent.h"

#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "copy/device_support.h"
#include "kvbounce/agent.h"
#include "kvbounce/transports.h"
#include "python/src/errors.h"
#include "python/src/model.h"

namespace kvbounce::python {
namespace py = pybind11;
namespace {

bool Finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// > 0 while this thread runs Python on kvbounce's behalf: a done callback,
// or the release of a reference kvbounce held. Blocking on the library there
// (Shutdown, Wait) could wait for this very thread.
thread_local int t_library_depth = 0;

class LibraryScope {
 public:
  LibraryScope() { ++t_library_depth; }
  ~LibraryScope() { --t_library_depth; }
  LibraryScope(const LibraryScope&) = delete;
  LibraryScope& operator=(const LibraryScope&) = delete;
};

// A reference to a Python object that kvbounce's threads may hold and drop:
// dropping it takes the GIL. Once the interpreter finalizes it is left as is.
class PyRef {
 public:
  explicit PyRef(py::object object) : object_(object.release().ptr()) {}
  ~PyRef() {
    if (object_ == nullptr || Finalizing()) return;
    py::gil_scoped_acquire gil;
    LibraryScope scope;
    Py_DECREF(object_);
  }
  PyRef(const PyRef&) = delete;
  PyRef& operator=(const PyRef&) = delete;
  py::handle get() const { return object_; }

 private:
  PyObject* object_;
};

// Runs fn(arg) holding the GIL; an exception goes to sys.unraisablehook.
void RunCallback(const PyRef& fn, const PyRef& arg) {
  if (Finalizing()) return;
  py::gil_scoped_acquire gil;
  LibraryScope scope;
  try {
    fn.get()(arg.get());
  } catch (py::error_already_set& e) {
    e.discard_as_unraisable(py::reinterpret_borrow<py::object>(fn.get()));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    PyErr_WriteUnraisable(fn.get().ptr());
  }
}

// Seconds from Python as milliseconds for the library: None stays empty; a
// positive value rounds up to a whole millisecond (so that a tiny timeout
// never becomes 0, which the library reads as "the default").
std::optional<std::chrono::milliseconds> Millis(std::optional<double> seconds, const char* what,
                                                bool allow_zero) {
  if (!seconds) return std::nullopt;
  const double s = *seconds;
  if (std::isnan(s) || s < 0 || (s == 0 && !allow_zero)) {
    ThrowStatus(InvalidArgumentError(std::string(what) + " = " + std::to_string(s) +
                                     " is invalid: must be " + (allow_zero ? ">= 0" : "> 0") +
                                     " seconds"));
  }
  // Beyond the library's limit (30 days) it says so with its own message.
  const double ms = std::ceil(s * 1000.0);
  const double cap = static_cast<double>(Config::kMaxTimeoutMs) + 1;
  return std::chrono::milliseconds(static_cast<int64_t>(std::min(ms, cap)));
}

// A block table from a list, tuple, range, a buffer of integers (NumPy) or
// anything with tolist() (a torch tensor). Ids must fit in 32 bits.
std::vector<int32_t> ToBlockTable(const py::handle& table) {
  std::vector<int32_t> out;
  auto add = [&](int64_t id) {
    if (id < std::numeric_limits<int32_t>::min() || id > std::numeric_limits<int32_t>::max()) {
      ThrowStatus(OutOfRangeError("block_table[" + std::to_string(out.size()) +
                                  "] = " + std::to_string(id) + " does not fit in 32 bits"));
    }
    out.push_back(static_cast<int32_t>(id));
  };
  if (PyObject_CheckBuffer(table.ptr()) && !py::isinstance<py::bytes>(table) &&
      !py::isinstance<py::bytearray>(table)) {
    py::buffer_info info = py::reinterpret_borrow<py::buffer>(table).request();
    if (info.ndim != 1) throw py::type_error("block_table must be one-dimensional");
    const char kind = info.format.empty() ? '?' : info.format.back();
    const bool is_signed = kind == 'b' || kind == 'h' || kind == 'i' || kind == 'l' || kind == 'q';
    const bool is_unsigned =
        kind == 'B' || kind == 'H' || kind == 'I' || kind == 'L' || kind == 'Q';
    if (!is_signed && !is_unsigned) {
      throw py::type_error("block_table must hold integers, not buffer format '" + info.format +
                           "'");
    }
    const auto* base = static_cast<const char*>(info.ptr);
    out.reserve(static_cast<size_t>(info.shape[0]));
    for (py::ssize_t i = 0; i < info.shape[0]; ++i) {
      const char* p = base + i * info.strides[0];
      int64_t v = 0;
      uint64_t u = 0;
      switch (info.itemsize) {
        case 1:
          v = is_signed ? *reinterpret_cast<const int8_t*>(p)
                        : *reinterpret_cast<const uint8_t*>(p);
          break;
        case 2:
          v = is_signed ? *reinterpret_cast<const int16_t*>(p)
                        : *reinterpret_cast<const uint16_t*>(p);
          break;
        case 4:
          v = is_signed ? *reinterpret_cast<const int32_t*>(p)
                        : *reinterpret_cast<const uint32_t*>(p);
          break;
        case 8:
          if (is_signed) {
            v = *reinterpret_cast<const int64_t*>(p);
          } else {
            u = *reinterpret_cast<const uint64_t*>(p);
            v = u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
                    ? std::numeric_limits<int64_t>::max()
                    : static_cast<int64_t>(u);
          }
          break;
        default:
          throw py::type_error("block_table: items of " + std::to_string(info.itemsize) +
                               " bytes are not integers kvbounce reads");
      }
      add(v);
    }
    return out;
  }
  py::object items = py::reinterpret_borrow<py::object>(table);
  if (!PyList_Check(items.ptr()) && !PyTuple_Check(items.ptr()) && py::hasattr(items, "tolist")) {
    items = items.attr("tolist")();
  }
  if (PyList_Check(items.ptr())) out.reserve(static_cast<size_t>(PyList_GET_SIZE(items.ptr())));
  for (py::handle item : py::iter(items)) {
    if (py::isinstance<py::bool_>(item) || py::isinstance<py::float_>(item)) {
      throw py::type_error("block_table must hold integers, not " +
                           std::string(py::str(py::type::of(item).attr("__name__"))));
    }
    // Python ints are unbounded: anything outside int64 is out of range too.
    py::int_ value = py::reinterpret_steal<py::int_>(PyNumber_Index(item.ptr()));
    if (!value) throw py::error_already_set();
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
    add(overflow > 0   ? std::numeric_limits<int64_t>::max()
        : overflow < 0 ? std::numeric_limits<int64_t>::min()
                       : static_cast<int64_t>(v));
  }
  return out;
}

TokenRange ToTokenRange(const py::handle& tokens) {
  if (py::isinstance<py::int_>(tokens)) return TokenRange{0, tokens.cast<int64_t>()};
  if (py::isinstance<py::tuple>(tokens) || py::isinstance<py::list>(tokens)) {
    auto pair = tokens.cast<std::vector<int64_t>>();
    if (pair.size() == 2) return TokenRange{pair[0], pair[1]};
  }
  if (py::isinstance(tokens, py::module_::import("builtins").attr("range"))) {
    if (tokens.attr("step").cast<int64_t>() != 1) {
      throw py::value_error("tokens: a range must have step 1");
    }
    return TokenRange{tokens.attr("start").cast<int64_t>(), tokens.attr("stop").cast<int64_t>()};
  }
  throw py::type_error("tokens must be a count n (tokens [0, n)), a (start, end) pair or a range");
}

py::dict InfoDict(const TransferInfo& info) {
  py::dict d;
  d["request_id"] = info.request_id;
  d["path_requested"] = std::string(TransferPathName(info.path_requested));
  d["path_taken"] = std::string(TransferPathName(info.path_taken));
  d["fallback_reason"] = info.fallback_reason;
  d["bytes"] = info.bytes;
  d["fragments"] = info.fragments;
  d["transport_writes"] = info.transport_writes;
  d["writers"] = info.writers;
  d["latency"] = std::chrono::duration<double>(info.latency).count();
  return d;
}

// kvbounce.Transfer: a pull or a publication in flight.
class PyTransfer {
 public:
  PyTransfer(std::shared_ptr<Transfer> transfer, const char* kind)
      : transfer_(std::move(transfer)), kind_(kind) {}

  uint64_t request_id() const { return transfer_->request_id(); }
  const char* kind() const { return kind_; }
  bool done() const { return transfer_->Poll().has_value(); }

  // True once settled OK; raises the outcome's error; false when `timeout`
  // seconds passed first. Waits in slices so that Ctrl-C reaches Python.
  bool Wait(std::optional<double> timeout) {
    if (t_library_depth > 0 && !done()) {
      ThrowStatus(FailedPreconditionError(
          "Transfer.wait() inside a done callback would block the thread that settles "
          "transfers: check done() or add another callback instead"));
    }
    using Clock = std::chrono::steady_clock;
    const std::optional<std::chrono::milliseconds> limit = Millis(timeout, "timeout", true);
    const Clock::time_point deadline = limit ? Clock::now() + *limit : Clock::time_point::max();
    constexpr std::chrono::milliseconds kSlice{50};
    while (true) {
      const Clock::time_point now = Clock::now();
      const auto slice =
          limit ? std::min<Clock::duration>(kSlice, std::max<Clock::duration>(deadline - now, {}))
                : Clock::duration(kSlice);
      bool settled = false;
      {
        py::gil_scoped_release nogil;
        settled = transfer_->WaitFor(slice);
      }
      if (settled) break;
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      if (limit && Clock::now() >= deadline) return false;
    }
    ThrowIfError(*transfer_->Poll());
    return true;
  }

  py::object Exception() const {
    std::optional<Status> outcome = transfer_->Poll();
    if (!outcome || outcome->ok()) return py::none();
    return ErrorFromStatus(*outcome);
  }

  void Cancel() {
    py::gil_scoped_release nogil;
    transfer_->Cancel();
  }

  void AddDoneCallback(const py::object& self, const py::function& fn) {
    auto callback = std::make_shared<PyRef>(fn);
    auto arg = std::make_shared<PyRef>(self);
    py::gil_scoped_release nogil;
    transfer_->OnDone([callback, arg](const Status&) { RunCallback(*callback, *arg); });
  }

  py::dict Info() const { return InfoDict(transfer_->info()); }

  std::string Repr() const {
    std::optional<Status> outcome = transfer_->Poll();
    return "<kvbounce.Transfer " + std::string(kind_) + " of request " +
           std::to_string(request_id()) + ": " + (outcome ? outcome->ToString() : "pending") + ">";
  }

 private:
  std::shared_ptr<Transfer> transfer_;
  const char* kind_;
};

struct PyFabric {
  std::shared_ptr<LoopbackFabric> fabric = NewLoopbackFabric();
};

// Agents whose last reference went away on a kvbounce thread, shut down by
// the main thread's next pending call (or DrainDeferred at exit).
struct Deferred {
  std::unique_ptr<Agent> agent;
  py::object keepalive;
};
std::mutex g_deferred_mu;
std::vector<std::unique_ptr<Deferred>> g_deferred;

void DrainDeferred() {
  std::vector<std::unique_ptr<Deferred>> items;
  {
    std::lock_guard<std::mutex> lock(g_deferred_mu);
    items.swap(g_deferred);
  }
  if (items.empty()) return;
  {
    py::gil_scoped_release nogil;
    for (auto& item : items) item->agent.reset();  // ~Agent shuts it down
  }
  items.clear();  // the pools' references, with the GIL
}

int DrainDeferredCall(void*) {
  try {
    DrainDeferred();
  } catch (py::error_already_set& e) {
    e.discard_as_unraisable("kvbounce: shutting down an agent");
  }
  return 0;
}

// The options _Agent's constructor takes, apart from the pool's Python side.
struct AgentArgs {
  std::string role;
  const Instance* instance = nullptr;
  int rank = 0;
  std::string instance_id;
  std::vector<uint64_t> bases;
  std::string memory;
  int device = 0;
  int64_t num_blocks = 0;
  py::dict config;
  std::string transport;
  PyFabric* fabric = nullptr;
  std::string loopback_name;
  std::string listen;
  uint64_t put_chunk_bytes = 0;
  bool same_host_shared_memory = true;
  std::string ipc_address;
  double connect_timeout = 10;
  double grace = 1;
  py::object faults;
};

MemoryKind ParseMemory(const std::string& name) {
  if (name == "host") return MemoryKind::kHost;
  if (name == "pinned-host" || name == "pinned") return MemoryKind::kPinnedHost;
  if (name == "cuda") return MemoryKind::kCuda;
  ThrowStatus(InvalidArgumentError("pool memory kind '" + name +
                                   "' is invalid: must be host, pinned-host or cuda"));
}

Config ToConfig(const py::dict& values) {
  Config config;
  for (auto [key, value] : values) {
    const std::string k = py::str(key);
    std::string text;
    if (py::isinstance<py::bool_>(value)) {
      text = value.cast<bool>() ? "1" : "0";
    } else if (py::isinstance<py::int_>(value) || py::isinstance<py::str>(value)) {
      text = py::str(value);
    } else {
      ThrowStatus(InvalidArgumentError("config: " + k + " = " + std::string(py::repr(value)) +
                                       " is invalid: give an int (or the path's name)"));
    }
    ThrowIfError(config.Set(k, text));
  }
  return config;
}

FaultInjection ToFaults(const py::dict& values) {
  FaultInjection f;
  for (auto [key, value] : values) {
    const std::string k = py::str(key);
    if (k == "write_fail_rate") {
      f.write_fail_rate = value.cast<double>();
    } else if (k == "delay_us") {
      f.delay = std::chrono::microseconds(value.cast<int64_t>());
    } else if (k == "drop_after_ops") {
      f.drop_after_ops = value.cast<int64_t>();
    } else if (k == "seed") {
      f.seed = value.cast<uint64_t>();
    } else {
      ThrowStatus(
          InvalidArgumentError("faults: unknown key '" + k +
                               "' (known: write_fail_rate, delay_us, drop_after_ops, seed)"));
    }
  }
  return f;
}

// kvbounce._Agent: one rank's agent, and the Python objects its pool lives in.
class PyAgent {
 public:
  explicit PyAgent(const AgentArgs& a) {
    AgentOptions o;
    o.instance_id = a.instance_id;
    if (a.role == "ctx") {
      o.role = Role::kCtx;
    } else if (a.role == "gen") {
      o.role = Role::kGen;
    } else {
      ThrowStatus(InvalidArgumentError("role = '" + a.role + "' is invalid: must be ctx or gen"));
    }
    o.instance = a.instance->spec();
    o.rank = a.rank;
    for (uint64_t base : a.bases) o.pool.bases.push_back(Addr(base));
    o.pool.num_blocks = a.num_blocks;
    o.pool.memory = ParseMemory(a.memory);
    o.pool.device = a.device;
    o.config = ToConfig(a.config);
    o.connect_timeout = *Millis(a.connect_timeout, "connect_timeout", false);
    o.grace = *Millis(a.grace, "grace", true);
    TransportSpec& spec = o.transport_spec;
    spec.kind = a.transport;
    spec.loopback_name = a.loopback_name;
    spec.listen_address = a.listen;
    spec.put_chunk_bytes = a.put_chunk_bytes;
    spec.same_host_shared_memory = a.same_host_shared_memory;
    spec.ipc_address = a.ipc_address;
    if (a.fabric != nullptr) spec.fabric = a.fabric->fabric;
    std::optional<FaultInjection> faults;
    if (!a.faults.is_none()) {
      if (a.transport != "loopback") {
        ThrowStatus(UnimplementedError("faults: injected faults need transport='loopback'"));
      }
      faults = ToFaults(a.faults.cast<py::dict>());
    }
    describe_ = a.instance_id + " rank " + std::to_string(a.rank);
    Result<std::unique_ptr<Agent>> made = [&]() -> Result<std::unique_ptr<Agent>> {
      py::gil_scoped_release nogil;
      if (faults) {
        if (spec.fabric == nullptr) {
          return InvalidArgumentError("faults: a loopback transport needs a fabric");
        }
        LoopbackOptions loopback;
        loopback.poll_before_sleep = std::chrono::microseconds(o.config.poll_before_sleep_us);
        KVB_ASSIGN_OR_RETURN(std::unique_ptr<Transport> inner,
                             NewLoopbackTransport(spec.fabric,
                                                  spec.loopback_name.empty()
                                                      ? o.instance_id + "-" + std::to_string(o.rank)
                                                      : spec.loopback_name,
                                                  loopback));
        KVB_ASSIGN_OR_RETURN(o.transport, NewFaultTransport(std::move(inner), *faults));
      }
      return Agent::Create(std::move(o));
    }();
    agent_ = ValueOrThrow(std::move(made));
  }

  // Set after construction: the pool's Python objects, released once the
  // agent no longer touches them.
  void set_keepalive(py::object keepalive) { keepalive_ = std::move(keepalive); }

  ~PyAgent() {
    if (t_library_depth > 0) {
      auto item = std::make_unique<Deferred>();
      item->agent = std::move(agent_);
      item->keepalive = std::move(keepalive_);
      {
        std::lock_guard<std::mutex> lock(g_deferred_mu);
        g_deferred.push_back(std::move(item));
      }
      // When the queue is full, the next call (or the exit handler) drains it.
      Py_AddPendingCall(&DrainDeferredCall, nullptr);
      return;
    }
    py::gil_scoped_release nogil;
    agent_.reset();
  }

  std::string Address() const { return agent_->Address(); }

  void Connect(const py::object& peers) {
    std::vector<std::string> addresses;
    if (py::isinstance<py::str>(peers)) {
      addresses.push_back(peers.cast<std::string>());
    } else {
      addresses = peers.cast<std::vector<std::string>>();
    }
    Status status;
    {
      py::gil_scoped_release nogil;
      status = agent_->Connect(addresses);
    }
    ThrowIfError(status);
  }

  PyTransfer Publish(uint64_t request_id, const py::handle& table, int64_t num_tokens,
                     std::optional<double> ttl) {
    const std::vector<int32_t> blocks = ToBlockTable(table);
    PublishOptions options;
    if (auto ms = Millis(ttl, "ttl", false)) options.ttl = *ms;
    Result<std::shared_ptr<Transfer>> t = [&] {
      py::gil_scoped_release nogil;
      return agent_->Publish(request_id, blocks, num_tokens, options);
    }();
    return PyTransfer(ValueOrThrow(std::move(t)), "publication");
  }

  PyTransfer Pull(uint64_t request_id, const std::string& ctx_instance, const py::handle& table,
                  const py::handle& tokens, std::optional<std::string> path,
                  std::optional<double> timeout) {
    const std::vector<int32_t> blocks = ToBlockTable(table);
    const TokenRange range = ToTokenRange(tokens);
    PullOptions options;
    if (path) options.path = ValueOrThrow(ParseTransferPath(*path));
    if (auto ms = Millis(timeout, "timeout", false)) options.timeout = *ms;
    Result<std::shared_ptr<Transfer>> t = [&] {
      py::gil_scoped_release nogil;
      return agent_->Pull(request_id, ctx_instance, blocks, range, options);
    }();
    return PyTransfer(ValueOrThrow(std::move(t)), "pull");
  }

  void Retire(uint64_t request_id) {
    Status status;
    {
      py::gil_scoped_release nogil;
      status = agent_->Retire(request_id);
    }
    ThrowIfError(status);
  }

  int ReceiverCount(const std::string& gen_instance) const {
    Result<int> n = [&] {
      py::gil_scoped_release nogil;
      return agent_->ReceiverCount(gen_instance);
    }();
    return ValueOrThrow(std::move(n));
  }

  std::vector<std::string> Paths(const std::string& ctx_instance) const {
    Result<std::vector<TransferPath>> paths = [&] {
      py::gil_scoped_release nogil;
      return agent_->Paths(ctx_instance);
    }();
    std::vector<std::string> names;
    for (TransferPath p : ValueOrThrow(std::move(paths))) {
      names.emplace_back(TransferPathName(p));
    }
    return names;
  }

  py::dict Stats() const {
    AgentStats s;
    {
      py::gil_scoped_release nogil;
      s = agent_->Stats();
    }
    py::dict d;
    d["requests_completed"] = s.requests_completed;
    d["requests_failed"] = s.requests_failed;
    d["requests_cancelled"] = s.requests_cancelled;
    d["requests_timed_out"] = s.requests_timed_out;
    d["bytes_completed"] = s.bytes_completed;
    d["transport_writes"] = s.transport_writes;
    d["transport_write_ops"] = s.transport_write_ops;
    d["rejected_results"] = s.rejected_results;
    d["quarantined_slots"] = s.quarantined_slots;
    d["fallbacks"] = s.fallbacks;
    d["arena_outstanding_bytes"] = s.arena_outstanding_bytes;
    d["arena_quarantined_bytes"] = s.arena_quarantined_bytes;
    d["arena_peak_bytes"] = s.arena_peak_bytes;
    d["chunks_granted"] = s.chunks_granted;
    d["chunks_written"] = s.chunks_written;
    d["chunks_scattered"] = s.chunks_scattered;
    d["credit_stall"] = std::chrono::duration<double>(s.credit_stall).count();
    d["grant_queue"] = s.grant_queue;
    d["grant_queue_peak"] = s.grant_queue_peak;
    d["detail"] = py::module_::import("json").attr("loads")(s.json);
    return d;
  }

  // Shuts the agent down (every request settles), then lets the pool go.
  void Close() {
    if (t_library_depth > 0) {
      ThrowStatus(FailedPreconditionError(
          "Agent.close() inside a done callback would wait for the thread running it: close "
          "the agent from another thread"));
    }
    {
      py::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lock(close_mu_);
      agent_->Shutdown();
      closed_ = true;
    }
    keepalive_ = py::none();
  }

  bool closed() const { return closed_; }
  const std::string& describe() const { return describe_; }
  Agent& agent() { return *agent_; }

 private:
  std::unique_ptr<Agent> agent_;
  py::object keepalive_;  // touched with the GIL only
  std::mutex close_mu_;
  std::atomic<bool> closed_{false};
  std::string describe_;
};

// The C++ half of the Python layer's benchmark (python/bench/overhead.py):
// `count` one-at-a-time requests of publish + pull + wait through the C++
// API on two agents the benchmark made; the seconds they took.
double RoundTripSeconds(PyAgent& ctx, PyAgent& gen, const std::string& ctx_instance,
                        uint64_t first_request_id, int count, const std::vector<int32_t>& ctx_table,
                        const std::vector<int32_t>& gen_table, int64_t tokens) {
  Status status;
  std::chrono::steady_clock::duration elapsed{};
  {
    py::gil_scoped_release nogil;
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < count && status.ok(); ++i) {
      const uint64_t id = first_request_id + static_cast<uint64_t>(i);
      Result<std::shared_ptr<Transfer>> pub = ctx.agent().Publish(id, ctx_table, tokens);
      if (!pub.ok()) {
        status = pub.status();
        break;
      }
      Result<std::shared_ptr<Transfer>> pull =
          gen.agent().Pull(id, ctx_instance, gen_table, TokenRange{0, tokens});
      if (!pull.ok()) {
        status = pull.status();
        break;
      }
      status = (*pull)->Wait();
      if (status.ok()) status = (*pub)->Wait();
    }
    elapsed = std::chrono::steady_clock::now() - start;
  }
  ThrowIfError(status);
  return std::chrono::duration<double>(elapsed).count();
}

}  // namespace

void RegisterAgent(py::module_& m) {
  py::class_<PyFabric>(m, "LoopbackFabric",
                       "Connects the loopback transports of this process; agents on one "
                       "fabric reach each other by address.")
      .def(py::init<>());

  py::class_<PyTransfer>(m, "Transfer",
                         "A pull or a publication in flight. Settles exactly once; from then on "
                         "kvbounce no longer touches its blocks.")
      .def_property_readonly("request_id", &PyTransfer::request_id)
      .def_property_readonly("kind", &PyTransfer::kind, "'pull' or 'publication'")
      .def("done", &PyTransfer::done, "True once the transfer settled.")
      .def("wait", &PyTransfer::Wait, py::arg("timeout") = py::none(),
           "Waits until the transfer settled, at most `timeout` seconds (None: no limit). True "
           "when it settled OK; raises its kvbounce.Error when it failed; False when the time "
           "ran out first (the transfer goes on). The GIL is released meanwhile.")
      .def("exception", &PyTransfer::Exception,
           "The error the transfer settled with; None while pending or when it succeeded.")
      .def("cancel", &PyTransfer::Cancel,
           "Asks the agent to cancel: the transfer settles with CancelledError unless it "
           "settles otherwise first. Never blocks.")
      .def(
          "add_done_callback",
          [](py::object self, const py::function& fn) {
            self.cast<PyTransfer&>().AddDoneCallback(self, fn);
          },
          py::arg("fn"),
          "Calls fn(transfer) once the transfer settled: on the agent's control thread, or at "
          "once when it already has. Keep it short; it must not close the agent or wait.")
      .def("info", &PyTransfer::Info,
           "Path, bytes, fragments, writers and latency (final once settled).")
      .def("__repr__", &PyTransfer::Repr);

  py::class_<PyAgent>(m, "_Agent", "The C++ agent; kvbounce.Agent subclasses it.")
      .def(py::init([](const std::string& role, const Instance& instance, int rank,
                       const std::string& instance_id, std::vector<uint64_t> bases,
                       const std::string& memory, int device, int64_t num_blocks,
                       py::object keepalive, std::optional<py::dict> config,
                       const std::string& transport, PyFabric* fabric,
                       const std::string& loopback_name, const std::string& listen,
                       uint64_t put_chunk_bytes, bool same_host_shared_memory,
                       const std::string& ipc_address, double connect_timeout, double grace,
                       py::object faults) {
             AgentArgs a;
             a.role = role;
             a.instance = &instance;
             a.rank = rank;
             a.instance_id = instance_id;
             a.bases = std::move(bases);
             a.memory = memory;
             a.device = device;
             a.num_blocks = num_blocks;
             a.config = config.value_or(py::dict());
             a.transport = transport;
             a.fabric = fabric;
             a.loopback_name = loopback_name;
             a.listen = listen;
             a.put_chunk_bytes = put_chunk_bytes;
             a.same_host_shared_memory = same_host_shared_memory;
             a.ipc_address = ipc_address;
             a.connect_timeout = connect_timeout;
             a.grace = grace;
             a.faults = std::move(faults);
             auto agent = std::make_unique<PyAgent>(a);
             agent->set_keepalive(std::move(keepalive));
             return agent;
           }),
           py::arg("role"), py::arg("instance"), py::arg("rank"), py::arg("instance_id"),
           py::arg("bases"), py::arg("memory"), py::arg("device"), py::arg("num_blocks"),
           py::arg("keepalive"), py::arg("config"), py::arg("transport"), py::arg("fabric"),
           py::arg("loopback_name"), py::arg("listen"), py::arg("put_chunk_bytes"),
           py::arg("same_host_shared_memory"), py::arg("ipc_address"), py::arg("connect_timeout"),
           py::arg("grace"), py::arg("faults"))
      .def_property_readonly("address", &PyAgent::Address,
                             "The transport address peers connect to.")
      .def("connect", &PyAgent::Connect, py::arg("peers"),
           "Connects to each address (one string or a list) and exchanges HELLO; returns once "
           "every peer answered.")
      .def("publish", &PyAgent::Publish, py::arg("request_id"), py::arg("block_table"),
           py::arg("num_tokens"), py::kw_only(), py::arg("ttl") = py::none(),
           "ctx side: the KV of request_id is ready in block_table (tokens [0, num_tokens)). "
           "Returns the publication's Transfer; it settles once every gen rank that needs this "
           "rank's KV was served, or when `ttl` seconds passed first.")
      .def("retire", &PyAgent::Retire, py::arg("request_id"),
           "ctx side: forgets a publication (its transfer settles with CancelledError).")
      .def("pull", &PyAgent::Pull, py::arg("request_id"), py::arg("ctx_instance"),
           py::arg("block_table"), py::arg("tokens"), py::kw_only(), py::arg("path") = py::none(),
           py::arg("timeout") = py::none(),
           "gen side: pulls `tokens` (n, (start, end) or a range) of request_id from instance "
           "ctx_instance into block_table. path: per-block, bounce, direct or auto (None: the "
           "config's); timeout in seconds (None: the config's transfer_timeout_ms).")
      .def("receiver_count", &PyAgent::ReceiverCount, py::arg("gen_instance"))
      .def("paths", &PyAgent::Paths, py::arg("ctx_instance"),
           "The paths a pull from ctx_instance can take now.")
      .def("stats", &PyAgent::Stats, "The agent's counters, and 'detail': everything as JSON.")
      .def("close", &PyAgent::Close,
           "Shuts the agent down: requests in flight settle, threads stop, the pool is no longer "
           "touched (and no longer kept alive). Idempotent.")
      .def_property_readonly("closed", &PyAgent::closed)
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__",
           [](PyAgent& agent, const py::args&) {
             agent.Close();
             return false;
           })
      .def("__repr__", [](const PyAgent& agent) {
        return "<kvbounce.Agent " + agent.describe() + (agent.closed() ? " (closed)>" : ">");
      });

  m.def("_roundtrip_seconds", &RoundTripSeconds, py::arg("ctx"), py::arg("gen"),
        py::arg("ctx_instance"), py::arg("first_request_id"), py::arg("count"),
        py::arg("ctx_table"), py::arg("gen_table"), py::arg("tokens"),
        "Benchmark helper: `count` requests of publish + pull + wait through the C++ API.");
  m.def("_drain_deferred", &DrainDeferred,
        "Shuts down the agents released on kvbounce's threads (the exit handler calls it).");
  m.def(
      "cuda_available", [] { return CudaSupport() != nullptr; },
      "True when this build has CUDA (pools may then be CUDA tensors).");
  m.def(
      "cuda_device_count",
      [] {
        const DeviceSupport* cuda = CudaSupport();
        return cuda == nullptr ? 0 : cuda->DeviceCount();
      },
      "CUDA devices this process can use (0 in a build without CUDA).");
  m.def("ucx_available", &UcxTransportAvailable, "True when this build has the UCX transport.");
}

}  // namespace kvbounce::python
