// GoogleTest matchers for Status and Result<T>, shared by every test:
//
//   EXPECT_THAT(arena->Reserve(1, 0ms), StatusIs(StatusCode::kResourceExhausted));
//   EXPECT_THAT(status, StatusIs(StatusCode::kInvalidArgument, HasSubstr("tp")));
//   ASSERT_THAT(result, IsOk());
#ifndef KVBOUNCE_TESTS_COMMON_STATUS_MATCHERS_H_
#define KVBOUNCE_TESTS_COMMON_STATUS_MATCHERS_H_

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

#include "kvbounce/status.h"

namespace kvbounce::testing_util {

inline const Status& StatusOf(const Status& status) { return status; }
template <typename T>
const Status& StatusOf(const Result<T>& result) {
  return result.status();
}

// EXPECT_THAT(s, StatusIs(StatusCode::kOutOfRange)) — works for Status and
// Result<T>; the two-argument form also matches the message.
MATCHER_P(StatusIs, code, "has status code " + std::string(StatusCodeName(code))) {
  const Status& status = StatusOf(arg);
  *result_listener << "whose status is " << status;
  return status.code() == code;
}

MATCHER_P2(StatusIs, code, message_matcher,
           "has status code " + std::string(StatusCodeName(code)) + " and a message that " +
               ::testing::DescribeMatcher<std::string>(message_matcher)) {
  const Status& status = StatusOf(arg);
  *result_listener << "whose status is " << status;
  return status.code() == code &&
         ::testing::Matches(message_matcher)(std::string(status.message()));
}

MATCHER(IsOk, "is OK") {
  const Status& status = StatusOf(arg);
  *result_listener << "whose status is " << status;
  return status.ok();
}

}  // namespace kvbounce::testing_util

#endif  // KVBOUNCE_TESTS_COMMON_STATUS_MATCHERS_H_
