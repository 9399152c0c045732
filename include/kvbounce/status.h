// Status and Result<T>: how every fallible kvbounce call reports its outcome.
//
// The library never throws. A call that can fail returns a Status (no value)
// or a Result<T> (a T, or the Status that says why there is none). Both are
// cheap when OK: an OK Status holds no allocation. The message of an error
// names what was wrong (the field, the peer, the request) and is meant for a
// human; the code is meant for a program deciding what to do next.
//
// Thread safety: a Status or Result is a value; distinct objects may be used
// from distinct threads, a single object needs external synchronization.
#ifndef KVBOUNCE_STATUS_H_
#define KVBOUNCE_STATUS_H_

#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

namespace kvbounce {

// What kind of failure a Status reports. Callers branch on these:
//   kInvalidArgument    the caller passed something that can never work
//                       (bad config value, impossible topology, bad flag).
//   kOutOfRange         a value lies outside what the object can hold (a
//                       token range past a block table, a request larger
//                       than an arena).
//   kResourceExhausted  backpressure: nothing free before the deadline; the
//                       caller may fall back or retry.
//   kDeadlineExceeded   a transfer did not finish before its deadline.
//   kCancelled          the application or the peer cancelled.
//   kDataLoss           bytes arrived that cannot be trusted (malformed
//                       frame, fingerprint or byte-count mismatch).
//   kUnavailable        a peer or transport is gone or not reachable.
//   kAborted            the object was closed or shut down underneath the
//                       call.
//   kFailedPrecondition the call is not valid in the object's current state.
//   kNotFound           an id that was never known.
//   kAlreadyExists      an id that is already in use.
//   kUnimplemented      the capability is not available here (e.g. a path
//                       the transport cannot take).
//   kInternal           a broken invariant or a failed system call.
enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument,
  kOutOfRange,
  kResourceExhausted,
  kDeadlineExceeded,
  kCancelled,
  kDataLoss,
  kUnavailable,
  kAborted,
  kFailedPrecondition,
  kNotFound,
  kAlreadyExists,
  kUnimplemented,
  kInternal,
};

// The name of a code, e.g. "INVALID_ARGUMENT".
std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  // An OK status.
  Status() = default;
  Status(StatusCode code, std::string_view message);

  Status(const Status& other);
  Status& operator=(const Status& other);
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;

  static Status Ok() { return Status(); }

  bool ok() const { return rep_ == nullptr; }
  StatusCode code() const { return rep_ ? rep_->code : StatusCode::kOk; }
  // Empty for an OK status.
  std::string_view message() const;
  // "OK" or "CODE: message".
  std::string ToString() const;

  // The same status with "context: " put in front of its message. An OK
  // status stays OK. Used by the function that first knows the context.
  Status WithContext(std::string_view context) const;

  // Explicitly ignores this status (for destructors and best-effort paths).
  void IgnoreError() const {}

  friend bool operator==(const Status& a, const Status& b) {
    return a.code() == b.code() && a.message() == b.message();
  }

 private:
  struct Rep {
    StatusCode code;
    std::string message;
  };
  std::unique_ptr<Rep> rep_;
};

std::ostream& operator<<(std::ostream& os, const Status& status);

// Constructors named after the codes, e.g. InvalidArgumentError("...").
Status InvalidArgumentError(std::string_view message);
Status OutOfRangeError(std::string_view message);
Status ResourceExhaustedError(std::string_view message);
Status DeadlineExceededError(std::string_view message);
Status CancelledError(std::string_view message);
Status DataLossError(std::string_view message);
Status UnavailableError(std::string_view message);
Status AbortedError(std::string_view message);
Status FailedPreconditionError(std::string_view message);
Status NotFoundError(std::string_view message);
Status AlreadyExistsError(std::string_view message);
Status UnimplementedError(std::string_view message);
Status InternalError(std::string_view message);

// A T, or the non-OK Status that explains why there is none.
//
// REQUIRES: a Result is built from a non-OK Status only (building one from an
// OK Status yields an kInternal error, never an empty value).
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(const T& value) : value_(value) {}        // NOLINT: implicit by design
  Result(T&& value) : value_(std::move(value)) {}  // NOLINT
  template <typename U, typename = std::enable_if_t<std::is_constructible_v<T, U&&> &&
                                                    !std::is_same_v<std::decay_t<U>, T> &&
                                                    !std::is_same_v<std::decay_t<U>, Status>>>
  Result(U&& value) : value_(std::in_place, std::forward<U>(value)) {}  // NOLINT
  Result(Status status) : status_(std::move(status)) {                  // NOLINT
    if (status_.ok()) {
      status_ = Status(StatusCode::kInternal, "Result built from an OK status without a value");
    }
  }

  bool ok() const { return value_.has_value(); }
  const Status& status() const& {
    static const Status kOkStatus;
    return ok() ? kOkStatus : status_;
  }
  Status status() && { return ok() ? Status() : std::move(status_); }

  // REQUIRES: ok().
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T& operator*() & { return *value_; }
  const T& operator*() const& { return *value_; }
  T&& operator*() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }

 private:
  std::optional<T> value_;
  Status status_;
};

}  // namespace kvbounce

#define KVB_CONCAT_INNER_(a, b) a##b
#define KVB_CONCAT_(a, b) KVB_CONCAT_INNER_(a, b)

// Returns the status from the enclosing function if `expr` is not OK.
#define KVB_RETURN_IF_ERROR(expr)              \
  do {                                         \
    ::kvbounce::Status kvb_status_ = (expr);   \
    if (!kvb_status_.ok()) return kvb_status_; \
  } while (false)

// `lhs = value of expr`, or returns expr's status from the enclosing function.
#define KVB_ASSIGN_OR_RETURN(lhs, expr) \
  KVB_ASSIGN_OR_RETURN_IMPL_(KVB_CONCAT_(kvb_result_, __LINE__), lhs, expr)
#define KVB_ASSIGN_OR_RETURN_IMPL_(result, lhs, expr)  \
  auto result = (expr);                                \
  if (!result.ok()) return std::move(result).status(); \
  lhs = std::move(result).value()

#endif  // KVBOUNCE_STATUS_H_
