// An owning handle to a registration of memory with a transport.
//
// A transport (a module to the right of memory) registers a region before it
// can move bytes in or out of it: a UCP memory handle and its packed remote
// key, an exported CUDA IPC handle or VMM file descriptor. The arena
// (arena.h) must own that registration so it is released exactly once, and
// before the memory it covers is freed; but memory must not depend on any
// transport. This interface breaks the cycle: the transport implements
// Registration, and hands the arena a std::unique_ptr<Registration>.
//
// Destroying a Registration deregisters the memory. The destructor must not
// fail loudly: it logs problems (through kvbounce::Log) and returns.
//
// Thread safety: Describe() may be called from any thread while the object is
// alive. The arena destroys its registration from whichever thread released
// the arena's last outstanding byte (or closed it), with no arena lock held;
// an implementation must therefore tolerate destruction on any thread.
//
// Ownership: whatever the registration refers to (the transport's context or
// worker) must outlive it. When the arena owns the registration, that means:
// close the arena, and release every slot, before closing the transport
// (docs/sessions.md gives that shutdown order).
#ifndef KVBOUNCE_REGISTRATION_H_
#define KVBOUNCE_REGISTRATION_H_

#include <string_view>

namespace kvbounce {

class Registration {
 public:
  // Deregisters the memory.
  virtual ~Registration() = default;

  Registration(const Registration&) = delete;
  Registration& operator=(const Registration&) = delete;

  // A short human-readable description for logs and errors, e.g.
  // "ucx memh 0x7f..+64MiB". Valid while the object is alive.
  virtual std::string_view Describe() const = 0;

 protected:
  Registration() = default;
};

}  // namespace kvbounce

#endif  // KVBOUNCE_REGISTRATION_H_
