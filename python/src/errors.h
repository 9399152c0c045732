// How kvbounce's Status codes reach Python: one exception class per code,
// every one a subclass of kvbounce.Error (and of the builtin exception that
// reads the same where there is one: ValueError, TimeoutError, LookupError,
// NotImplementedError), carrying the Status message.
//
//   kvbounce.Error                      .code ("INVALID_ARGUMENT"), .message
//     InvalidArgumentError(ValueError)   OutOfRangeError(ValueError)
//     ResourceExhaustedError             DeadlineExceededError(TimeoutError)
//     CancelledError                     DataLossError
//     UnavailableError                   AbortedError
//     FailedPreconditionError            NotFoundError(LookupError)
//     AlreadyExistsError                 UnimplementedError(NotImplementedError)
//     InternalError
//
// Thread safety: every function here REQUIRES the GIL.
#ifndef KVBOUNCE_PYTHON_ERRORS_H_
#define KVBOUNCE_PYTHON_ERRORS_H_

#include <pybind11/pybind11.h>

#include <utility>

#include "kvbounce/status.h"

namespace kvbounce::python {

// Creates the classes and adds them to `m`. Called once, at import.
void RegisterErrors(pybind11::module_& m);

// The exception object of a non-OK status (an instance of its class).
pybind11::object ErrorFromStatus(const Status& status);

// Raises the exception of `status` (a non-OK status) as a C++ exception
// pybind11 turns back into the Python one.
[[noreturn]] void ThrowStatus(const Status& status);

inline void ThrowIfError(const Status& status) {
  if (!status.ok()) ThrowStatus(status);
}

template <typename T>
T ValueOrThrow(Result<T> result) {
  if (!result.ok()) ThrowStatus(result.status());
  return std::move(result).value();
}

}  // namespace kvbounce::python

#endif  // KVBOUNCE_PYTHON_ERRORS_H_
