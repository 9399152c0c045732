// UniqueFd: the owner of one POSIX file descriptor (a socket, a pidfd, an
// eventfd, a descriptor of exported CUDA memory), closed when the owner goes
// away. Move-only, like std::unique_ptr; -1 means "owns nothing".
//
// close(2) errors are ignored: on Linux the descriptor is released even when
// close reports EINTR or EIO, so there is nothing to retry, and a destructor
// has no one to tell.
//
// Thread safety: a value. Distinct objects may be used from distinct
// threads; one object needs external synchronization.
#ifndef KVBOUNCE_COMMON_UNIQUE_FD_H_
#define KVBOUNCE_COMMON_UNIQUE_FD_H_

#include <unistd.h>

#include <utility>

namespace kvbounce {

class UniqueFd {
 public:
  UniqueFd() = default;
  // Takes ownership of `fd` (-1 for none).
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { Reset(); }
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) {
      Reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  // The descriptor, still owned by this object; -1 when empty.
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  // Gives up ownership: returns the descriptor and leaves this empty.
  [[nodiscard]] int Release() { return std::exchange(fd_, -1); }
  // Closes the descriptor now (if any) and leaves this empty.
  void Reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_COMMON_UNIQUE_FD_H_
