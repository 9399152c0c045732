// Test helpers for the memory module: fakes that record
// when memory is freed and registrations are released.
#ifndef KVBOUNCE_TESTS_MEMORY_MEMORY_TEST_UTIL_H_
#define KVBOUNCE_TESTS_MEMORY_MEMORY_TEST_UTIL_H_

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "common/status_matchers.h"
#include "kvbounce/registration.h"
#include "kvbounce/status.h"
#include "memory/allocation.h"

namespace kvbounce::testing_util {

// Thread-safe list of events ("free mem", "deregister reg", ...).
class EventLog {
 public:
  void Add(std::string event) {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(std::move(event));
  }
  std::vector<std::string> events() const {
    std::lock_guard<std::mutex> lock(mu_);
    return events_;
  }

 private:
  mutable std::mutex mu_;
  std::vector<std::string> events_;
};

// An Allocation that records "free <label>" when destroyed. Host flavour:
// real memory from HostAllocation. Device flavour: a made-up address, never
// dereferenced, no host pointer (as device memory looks to the arena).
class FakeAllocation final : public Allocation {
 public:
  static std::unique_ptr<Allocation> Host(size_t bytes, std::shared_ptr<EventLog> log,
                                          std::string label = "mem") {
    auto inner = HostAllocation::Create(bytes, 4096);
    EXPECT_TRUE(inner.ok()) << inner.status();
    return std::unique_ptr<Allocation>(new FakeAllocation(std::move(inner).value(), Addr(), bytes,
                                                          MemoryKind::kHost, std::move(log),
                                                          std::move(label)));
  }
  static std::unique_ptr<Allocation> Device(Addr address, size_t bytes,
                                            std::shared_ptr<EventLog> log,
                                            std::string label = "mem") {
    return std::unique_ptr<Allocation>(new FakeAllocation(
        nullptr, address, bytes, MemoryKind::kCuda, std::move(log), std::move(label)));
  }

  ~FakeAllocation() override {
    inner_.reset();
    if (log_) log_->Add("free " + label_);
  }

  Addr address() const override { return inner_ ? inner_->address() : address_; }
  size_t size() const override { return size_; }
  MemoryKind kind() const override { return kind_; }
  void* host_pointer() const override { return inner_ ? inner_->host_pointer() : nullptr; }

 private:
  FakeAllocation(std::unique_ptr<Allocation> inner, Addr address, size_t size, MemoryKind kind,
                 std::shared_ptr<EventLog> log, std::string label)
      : inner_(std::move(inner)),
        address_(address),
        size_(size),
        kind_(kind),
        log_(std::move(log)),
        label_(std::move(label)) {}

  std::unique_ptr<Allocation> inner_;
  Addr address_;
  size_t size_;
  MemoryKind kind_;
  std::shared_ptr<EventLog> log_;
  std::string label_;
};

// A Registration that records "deregister <label>" when destroyed.
class FakeRegistration final : public Registration {
 public:
  FakeRegistration(std::shared_ptr<EventLog> log, std::string label)
      : log_(std::move(log)), label_(std::move(label)) {}
  ~FakeRegistration() override { log_->Add("deregister " + label_); }
  std::string_view Describe() const override { return label_; }

 private:
  std::shared_ptr<EventLog> log_;
  std::string label_;
};

}  // namespace kvbounce::testing_util

#endif  // KVBOUNCE_TESTS_MEMORY_MEMORY_TEST_UTIL_H_
