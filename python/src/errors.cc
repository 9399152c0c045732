#include "python/src/errors.h"

#include <array>
#include <string>

namespace kvbounce::python {
namespace py = pybind11;
namespace {

constexpr int kNumCodes = static_cast<int>(StatusCode::kInternal) + 1;

struct ErrorClass {
  StatusCode code;
  const char* name;
  PyObject* builtin;  // a second base, or nullptr
  const char* doc;
};

// Created once at import and kept for the life of the process (the module
// holds a reference too), as CPython's own exception classes are.
PyObject* g_base = nullptr;
std::array<PyObject*, kNumCodes> g_classes{};

}  // namespace

void RegisterErrors(py::module_& m) {
  const std::array<ErrorClass, kNumCodes - 1> classes = {{
      {StatusCode::kInvalidArgument, "InvalidArgumentError", PyExc_ValueError,
       "Something that can never work was passed: a bad config value, an impossible topology, "
       "a pool of the wrong dtype or size."},
      {StatusCode::kOutOfRange, "OutOfRangeError", PyExc_ValueError,
       "A value lies outside what the object holds: a block id outside the pool, a token range "
       "past a block table."},
      {StatusCode::kResourceExhausted, "ResourceExhaustedError", nullptr,
       "Backpressure, or memory or a thread that could not be had."},
      {StatusCode::kDeadlineExceeded, "DeadlineExceededError", PyExc_TimeoutError,
       "A transfer, publication or connect did not finish before its deadline."},
      {StatusCode::kCancelled, "CancelledError", nullptr,
       "The application or the peer cancelled (Transfer.cancel, Agent.retire)."},
      {StatusCode::kDataLoss, "DataLossError", nullptr,
       "Bytes arrived that cannot be trusted (a malformed frame, a plan mismatch)."},
      {StatusCode::kUnavailable, "UnavailableError", nullptr,
       "A peer or the transport is gone or cannot be reached; an injected fault."},
      {StatusCode::kAborted, "AbortedError", nullptr, "The agent was closed underneath the call."},
      {StatusCode::kFailedPrecondition, "FailedPreconditionError", nullptr,
       "The call is not valid in the current state (e.g. pulling before connecting)."},
      {StatusCode::kNotFound, "NotFoundError", PyExc_LookupError,
       "An id or name that was never known (a preset, an instance, a request)."},
      {StatusCode::kAlreadyExists, "AlreadyExistsError", nullptr,
       "An id that is already in use (a request id published or pulled twice)."},
      {StatusCode::kUnimplemented, "UnimplementedError", PyExc_NotImplementedError,
       "The capability is not available here (a path the transport cannot take, a CUDA pool "
       "in a build without CUDA)."},
      {StatusCode::kInternal, "InternalError", nullptr,
       "A broken invariant or a failed system call inside kvbounce."},
  }};
  g_base = PyErr_NewExceptionWithDoc(
      "kvbounce.Error",
      "Base of every kvbounce error. `code` is the status code's name (e.g. "
      "'INVALID_ARGUMENT'), `message` what went wrong.",
      PyExc_Exception, nullptr);
  if (g_base == nullptr) throw py::error_already_set();
  py::setattr(g_base, "code", py::str("UNKNOWN"));
  // `message`: the text the error was raised with (also for errors a Python
  // caller raises itself).
  py::setattr(g_base, "message",
              py::module_::import("builtins")
                  .attr("property")(py::cpp_function([](py::handle self) -> py::object {
                                      py::tuple args = self.attr("args");
                                      if (args.empty()) return py::str("");
                                      return py::str(args[0]);
                                    }),
                                    py::none(), py::none(), "What went wrong."));
  m.attr("Error") = py::handle(g_base);
  for (const ErrorClass& c : classes) {
    // Two statements, not a ?: between two make_tuple calls: pybind11 3
    // types each tuple by its arity, and the branches would disagree.
    py::tuple bases;
    if (c.builtin != nullptr) {
      bases = py::make_tuple(py::handle(g_base), py::handle(c.builtin));
    } else {
      bases = py::make_tuple(py::handle(g_base));
    }
    const std::string qualified = std::string("kvbounce.") + c.name;
    PyObject* cls = PyErr_NewExceptionWithDoc(qualified.c_str(), c.doc, bases.ptr(), nullptr);
    if (cls == nullptr) throw py::error_already_set();
    py::setattr(cls, "code", py::str(std::string(StatusCodeName(c.code))));
    g_classes[static_cast<size_t>(c.code)] = cls;
    m.attr(c.name) = py::handle(cls);
  }
}

py::object ErrorFromStatus(const Status& status) {
  PyObject* cls = nullptr;
  const int code = static_cast<int>(status.code());
  if (code > 0 && code < kNumCodes) cls = g_classes[static_cast<size_t>(code)];
  if (cls == nullptr) cls = g_base;
  return py::reinterpret_borrow<py::object>(cls)(py::str(std::string(status.message())));
}

void ThrowStatus(const Status& status) {
  py::object error = ErrorFromStatus(status);
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(error.ptr())), error.ptr());
  throw py::error_already_set();
}

}  // namespace kvbounce::python
