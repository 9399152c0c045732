#include "kvbounce/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvbounce/logging.h"
#include "kvbounce/status.h"

namespace kvbounce {
namespace {

using ::testing::HasSubstr;

std::string Message(const Status& status) { return std::string(status.message()); }

TEST(TransferPathTest, NamesRoundTrip) {
  const std::vector<std::pair<TransferPath, std::string_view>> names = {
      {TransferPath::kPerBlock, "per-block"},
      {TransferPath::kBounce, "bounce"},
      {TransferPath::kDirect, "direct"},
      {TransferPath::kAuto, "auto"},
  };
  for (const auto& [path, name] : names) {
    EXPECT_EQ(TransferPathName(path), name);
    Result<TransferPath> parsed = ParseTransferPath(name);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, path);
  }
  EXPECT_EQ(TransferPathName(static_cast<TransferPath>(42)), "?");
}

TEST(TransferPathTest, ParseRejectsOtherSpellings) {
  for (std::string_view bad : {"", "Auto", "per_block", "perblock", "bounce ", "fast", "?"}) {
    Result<TransferPath> parsed = ParseTransferPath(bad);
    ASSERT_FALSE(parsed.ok()) << bad;
    EXPECT_EQ(parsed.status().code(), StatusCode::kInvalidArgument);
    EXPECT_THAT(Message(parsed.status()), HasSubstr("\"" + std::string(bad) + "\""));
    EXPECT_THAT(Message(parsed.status()), HasSubstr("per-block, bounce, direct, auto"));
  }
}

TEST(ConfigTest, Defaults) {
  const Config config;
  EXPECT_EQ(config.bounce_size_mb, 0);
  EXPECT_EQ(config.num_workers, 1);
  EXPECT_EQ(config.transfer_timeout_ms, 60000);
  EXPECT_EQ(config.reserve_timeout_ms, 200);
  EXPECT_EQ(config.path, TransferPath::kAuto);
  // The cost figures of `auto`: the transport's and copy engine's own.
  EXPECT_EQ(config.transport_op_ns, 0);
  EXPECT_EQ(config.transport_mb_per_s, 0);
  EXPECT_EQ(config.copy_run_ns, 0);
  EXPECT_EQ(config.copy_mb_per_s, 0);
  EXPECT_EQ(config.poll_before_sleep_us, 0);
  EXPECT_EQ(config.inline_copy_kb, 64);
  EXPECT_EQ(config.progress_on_loop, 1);
  EXPECT_EQ(config.bounce_gather_mapped, 1);
  EXPECT_TRUE(config.Validate().ok()) << config.Validate();
}

// --- Validate: every rule ------------------------------------------------------

struct RuleCase {
  const char* name;
  std::function<void(Config&)> change;
  // Empty: the change is valid. Otherwise the exact message.
  std::string message;
};

TEST(ConfigValidateTest, EveryRule) {
  const std::vector<RuleCase> cases = {
      {"bounce_size_mb negative", [](Config& c) { c.bounce_size_mb = -1; },
       "config: bounce_size_mb = -1 is invalid: must be an integer >= 0 and <= 1048576 (1 TiB)"},
      {"bounce_size_mb too large",
       [](Config& c) { c.bounce_size_mb = Config::kMaxBounceSizeMb + 1; },
       "config: bounce_size_mb = 1048577 is invalid: must be an integer >= 0 and <= 1048576 "
       "(1 TiB)"},
      {"bounce_size_mb zero", [](Config& c) { c.bounce_size_mb = 0; }, ""},
      {"bounce_size_mb max", [](Config& c) { c.bounce_size_mb = Config::kMaxBounceSizeMb; }, ""},
      {"num_workers zero", [](Config& c) { c.num_workers = 0; },
       "config: num_workers = 0 is invalid: must be an integer >= 1 and <= 256"},
      {"num_workers negative", [](Config& c) { c.num_workers = -2; },
       "config: num_workers = -2 is invalid: must be an integer >= 1 and <= 256"},
      {"num_workers too large", [](Config& c) { c.num_workers = 257; },
       "config: num_workers = 257 is invalid: must be an integer >= 1 and <= 256"},
      {"num_workers max", [](Config& c) { c.num_workers = 256; }, ""},
      {"transfer_timeout_ms zero", [](Config& c) { c.transfer_timeout_ms = 0; },
       "config: transfer_timeout_ms = 0 is invalid: must be an integer > 0 and <= 2592000000 "
       "(30 days)"},
      {"transfer_timeout_ms negative", [](Config& c) { c.transfer_timeout_ms = -1; },
       "config: transfer_timeout_ms = -1 is invalid: must be an integer > 0 and <= 2592000000 "
       "(30 days)"},
      {"transfer_timeout_ms too large",
       [](Config& c) { c.transfer_timeout_ms = Config::kMaxTimeoutMs + 1; },
       "config: transfer_timeout_ms = 2592000001 is invalid: must be an integer > 0 and <= "
       "2592000000 (30 days)"},
      {"transfer_timeout_ms one", [](Config& c) { c.transfer_timeout_ms = 1; }, ""},
      {"reserve_timeout_ms negative", [](Config& c) { c.reserve_timeout_ms = -1; },
       "config: reserve_timeout_ms = -1 is invalid: must be an integer >= 0 and <= 2592000000 "
       "(30 days)"},
      {"reserve_timeout_ms too large",
       [](Config& c) { c.reserve_timeout_ms = Config::kMaxTimeoutMs + 1; },
       "config: reserve_timeout_ms = 2592000001 is invalid: must be an integer >= 0 and <= "
       "2592000000 (30 days)"},
      {"reserve_timeout_ms zero", [](Config& c) { c.reserve_timeout_ms = 0; }, ""},
      {"poll_before_sleep_us negative", [](Config& c) { c.poll_before_sleep_us = -1; },
       "config: poll_before_sleep_us = -1 is invalid: must be an integer >= 0 and <= 10000 (10 "
       "ms; 0: sleep at once)"},
      {"poll_before_sleep_us too large",
       [](Config& c) { c.poll_before_sleep_us = Config::kMaxPollUs + 1; },
       "config: poll_before_sleep_us = 10001 is invalid: must be an integer >= 0 and <= 10000 "
       "(10 ms; 0: sleep at once)"},
      {"poll_before_sleep_us at the limit",
       [](Config& c) { c.poll_before_sleep_us = Config::kMaxPollUs; }, ""},
      {"inline_copy_kb negative", [](Config& c) { c.inline_copy_kb = -1; },
       "config: inline_copy_kb = -1 is invalid: must be an integer >= 0 and <= 16384 (16 MiB; 0: "
       "never copy on the control loop)"},
      {"inline_copy_kb too large",
       [](Config& c) { c.inline_copy_kb = Config::kMaxInlineCopyKb + 1; },
       "config: inline_copy_kb = 16385 is invalid: must be an integer >= 0 and <= 16384 (16 MiB; "
       "0: never copy on the control loop)"},
      {"inline_copy_kb at the limit",
       [](Config& c) { c.inline_copy_kb = Config::kMaxInlineCopyKb; }, ""},
      {"inline_copy_kb off", [](Config& c) { c.inline_copy_kb = 0; }, ""},
      {"progress_on_loop 2", [](Config& c) { c.progress_on_loop = 2; },
       "config: progress_on_loop = 2 is invalid: must be an integer, 0 (the transport's own "
       "thread) or 1 (the control loop)"},
      {"progress_on_loop off", [](Config& c) { c.progress_on_loop = 0; }, ""},
      {"bounce_gather_mapped 2", [](Config& c) { c.bounce_gather_mapped = 2; },
       "config: bounce_gather_mapped = 2 is invalid: must be an integer, 0 (gather into a send "
       "slot, then write) or 1 (gather into the mapped recv slot)"},
      {"bounce_gather_mapped off", [](Config& c) { c.bounce_gather_mapped = 0; }, ""},
      {"path out of enum", [](Config& c) { c.path = static_cast<TransferPath>(9); },
       "config: path = 9 is invalid: must be one of per-block, bounce, direct, auto"},
      {"path per-block", [](Config& c) { c.path = TransferPath::kPerBlock; }, ""},
      {"path direct", [](Config& c) { c.path = TransferPath::kDirect; }, ""},
      {"path bounce without arena", [](Config& c) { c.path = TransferPath::kBounce; },
       "config: path = bounce is invalid: needs bounce_size_mb > 0 (bounce_size_mb = 0 turns "
       "the bounce path off)"},
      {"path bounce with arena",
       [](Config& c) {
         c.path = TransferPath::kBounce;
         c.bounce_size_mb = 64;
       },
       ""},
      {"transport_op_ns negative", [](Config& c) { c.transport_op_ns = -1; },
       "config: transport_op_ns = -1 is invalid: must be an integer >= 0 and <= 1000000000 (0: "
       "the transport's own figure)"},
      {"transport_op_ns too large", [](Config& c) { c.transport_op_ns = Config::kMaxOpNs + 1; },
       "config: transport_op_ns = 1000000001 is invalid: must be an integer >= 0 and <= "
       "1000000000 (0: the transport's own figure)"},
      {"transport_op_ns max", [](Config& c) { c.transport_op_ns = Config::kMaxOpNs; }, ""},
      {"transport_mb_per_s negative", [](Config& c) { c.transport_mb_per_s = -5; },
       "config: transport_mb_per_s = -5 is invalid: must be an integer >= 0 and <= 1000000000 "
       "(0: the transport's own figure)"},
      {"transport_mb_per_s too large",
       [](Config& c) { c.transport_mb_per_s = Config::kMaxMbPerS + 1; },
       "config: transport_mb_per_s = 1000000001 is invalid: must be an integer >= 0 and <= "
       "1000000000 (0: the transport's own figure)"},
      {"transport_mb_per_s one", [](Config& c) { c.transport_mb_per_s = 1; }, ""},
      {"copy_run_ns negative", [](Config& c) { c.copy_run_ns = -1; },
       "config: copy_run_ns = -1 is invalid: must be an integer >= 0 and <= 1000000000 (0: the "
       "copy engine's own figure)"},
      {"copy_run_ns max", [](Config& c) { c.copy_run_ns = Config::kMaxOpNs; }, ""},
      {"copy_mb_per_s negative", [](Config& c) { c.copy_mb_per_s = -1; },
       "config: copy_mb_per_s = -1 is invalid: must be an integer >= 0 and <= 1000000000 (0: "
       "the copy engine's own figure)"},
      {"copy_mb_per_s too large", [](Config& c) { c.copy_mb_per_s = INT64_MAX; },
       "config: copy_mb_per_s = 9223372036854775807 is invalid: must be an integer >= 0 and <= "
       "1000000000 (0: the copy engine's own figure)"},
      {"copy_mb_per_s max", [](Config& c) { c.copy_mb_per_s = Config::kMaxMbPerS; }, ""},
  };
  for (const RuleCase& c : cases) {
    SCOPED_TRACE(c.name);
    Config config;
    c.change(config);
    const Status status = config.Validate();
    if (c.message.empty()) {
      EXPECT_TRUE(status.ok()) << status;
    } else {
      EXPECT_EQ(status.code(), StatusCode::kInvalidArgument);
      EXPECT_EQ(Message(status), c.message);
    }
  }
}

TEST(ConfigValidateTest, ReportsTheFirstViolationInFieldOrder) {
  Config config;
  config.reserve_timeout_ms = -1;
  config.num_workers = 0;
  EXPECT_THAT(Message(config.Validate()), HasSubstr("num_workers = 0"));
}

// --- Set -------------------------------------------------------------------------

TEST(ConfigSetTest, GoodTextForEveryField) {
  Config config;
  ASSERT_TRUE(config.Set("bounce_size_mb", "256").ok());
  ASSERT_TRUE(config.Set("num_workers", "4").ok());
  ASSERT_TRUE(config.Set("transfer_timeout_ms", "1500").ok());
  ASSERT_TRUE(config.Set("reserve_timeout_ms", "0").ok());
  ASSERT_TRUE(config.Set("path", "bounce").ok());
  ASSERT_TRUE(config.Set("transport_op_ns", "2500").ok());
  ASSERT_TRUE(config.Set("transport_mb_per_s", "12000").ok());
  ASSERT_TRUE(config.Set("copy_run_ns", "40").ok());
  ASSERT_TRUE(config.Set("copy_mb_per_s", "9000").ok());
  EXPECT_EQ(config.bounce_size_mb, 256);
  EXPECT_EQ(config.num_workers, 4);
  EXPECT_EQ(config.transfer_timeout_ms, 1500);
  EXPECT_EQ(config.reserve_timeout_ms, 0);
  EXPECT_EQ(config.path, TransferPath::kBounce);
  EXPECT_EQ(config.transport_op_ns, 2500);
  EXPECT_EQ(config.transport_mb_per_s, 12000);
  EXPECT_EQ(config.copy_run_ns, 40);
  EXPECT_EQ(config.copy_mb_per_s, 9000);
  EXPECT_TRUE(config.Validate().ok());

  for (std::string_view name : {"per-block", "direct", "auto"}) {
    ASSERT_TRUE(config.Set("path", name).ok());
    EXPECT_EQ(TransferPathName(config.path), name);
  }
  // Leading zeros and "-0" are still base-10 integers.
  ASSERT_TRUE(config.Set("num_workers", "007").ok());
  EXPECT_EQ(config.num_workers, 7);
  ASSERT_TRUE(config.Set("bounce_size_mb", "-0").ok());
  EXPECT_EQ(config.bounce_size_mb, 0);
  // At the limit.
  ASSERT_TRUE(config.Set("transport_mb_per_s", "1000000000").ok());
  EXPECT_EQ(config.transport_mb_per_s, 1000000000);
}

TEST(ConfigSetTest, DashesAreAcceptedForUnderscores) {
  Config config;
  ASSERT_TRUE(config.Set("bounce-size-mb", "8").ok());
  ASSERT_TRUE(config.Set("transport-op-ns", "1024").ok());
  EXPECT_EQ(config.bounce_size_mb, 8);
  EXPECT_EQ(config.transport_op_ns, 1024);
}

struct BadText {
  std::string_view value;
  std::string_view why;  // the parenthesized reason, empty when the rule fails
};

TEST(ConfigSetTest, BadTextForEveryIntegerField) {
  const std::vector<BadText> not_integers = {
      {"1.5", "not an integer"},
      {"abc", "not an integer"},
      {"", "not an integer"},
      {" 1", "not an integer"},
      {"1 ", "not an integer"},
      {"+1", "not an integer"},
      {"1e3", "not an integer"},
      {"0x10", "not an integer"},
      {"2k", "not an integer"},
      {"-", "not an integer"},
      {"99999999999999999999", "out of the 64-bit integer range"},
      {"-99999999999999999999", "out of the 64-bit integer range"},
  };
  for (std::string_view key : Config::Keys()) {
    if (key == "path") continue;
    for (const BadText& bad : not_integers) {
      SCOPED_TRACE(std::string(key) + " = \"" + std::string(bad.value) + "\"");
      Config config;
      const Config before = config;
      const Status status = config.Set(key, bad.value);
      EXPECT_EQ(status.code(), StatusCode::kInvalidArgument);
      EXPECT_THAT(Message(status), HasSubstr("config: " + std::string(key) + " = \"" +
                                             std::string(bad.value) + "\" is invalid: must be"));
      EXPECT_THAT(Message(status), HasSubstr(std::string(bad.why)));
      EXPECT_EQ(config, before) << "a failed Set must not change the config";
    }
  }
}

TEST(ConfigSetTest, IntegersThatBreakTheFieldRule) {
  const std::vector<std::pair<std::string_view, std::string_view>> cases = {
      {"bounce_size_mb", "-1"},       {"bounce_size_mb", "1048577"},
      {"bounce_chunk_mb", "-1"},      {"bounce_chunk_mb", "1048577"},
      {"num_workers", "0"},           {"num_workers", "-3"},
      {"num_workers", "257"},         {"transfer_timeout_ms", "0"},
      {"transfer_timeout_ms", "-1"},  {"transfer_timeout_ms", "2592000001"},
      {"reserve_timeout_ms", "-1"},   {"reserve_timeout_ms", "2592000001"},
      {"transport_op_ns", "-1"},      {"transport_mb_per_s", "1000000001"},
      {"copy_run_ns", "-7"},          {"copy_mb_per_s", "1000000001"},
      {"poll_before_sleep_us", "-1"}, {"poll_before_sleep_us", "10001"},
      {"inline_copy_kb", "-1"},       {"inline_copy_kb", "16385"},
      {"progress_on_loop", "-1"},     {"progress_on_loop", "2"},
      {"bounce_gather_mapped", "2"},  {"bounce_gather_mapped", "-1"},
  };
  for (const auto& [key, value] : cases) {
    SCOPED_TRACE(std::string(key) + " = " + std::string(value));
    Config config;
    const Config before = config;
    const Status status = config.Set(key, value);
    EXPECT_EQ(status.code(), StatusCode::kInvalidArgument);
    EXPECT_THAT(Message(status), HasSubstr("config: " + std::string(key) + " = " +
                                           std::string(value) + " is invalid: must be an integer"));
    EXPECT_EQ(config, before);
  }
}

TEST(ConfigSetTest, BadPath) {
  Config config;
  const Status status = config.Set("path", "fastest");
  EXPECT_EQ(status.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(
      Message(status),
      "config: path = \"fastest\" is invalid: must be one of per-block, bounce, direct, auto");
  EXPECT_EQ(config.path, TransferPath::kAuto);
  EXPECT_FALSE(config.Set("path", "").ok());
}

TEST(ConfigSetTest, BouncePathIsCheckedAcrossFieldsOnlyByValidate) {
  // Set in either order; only the final combination matters.
  Config config;
  ASSERT_TRUE(config.Set("path", "bounce").ok());
  EXPECT_FALSE(config.Validate().ok());
  ASSERT_TRUE(config.Set("bounce_size_mb", "32").ok());
  EXPECT_TRUE(config.Validate().ok());
}

TEST(ConfigSetTest, UnknownKeyListsTheKnownKeys) {
  Config config;
  const Status status = config.Set("bounce_size", "1");
  EXPECT_EQ(status.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(status), HasSubstr("unknown key \"bounce_size\""));
  for (std::string_view key : Config::Keys()) {
    EXPECT_THAT(Message(status), HasSubstr(std::string(key)));
  }
  EXPECT_FALSE(config.Set("", "1").ok());
  EXPECT_FALSE(config.Set("NUM_WORKERS", "1").ok());
}

TEST(ConfigTest, KeysAreTheFieldsInOrder) {
  const std::vector<std::string_view> keys(Config::Keys().begin(), Config::Keys().end());
  EXPECT_EQ(keys, (std::vector<std::string_view>{
                      "bounce_size_mb", "bounce_chunk_mb", "num_workers", "transfer_timeout_ms",
                      "reserve_timeout_ms", "path", "transport_op_ns", "transport_mb_per_s",
                      "copy_run_ns", "copy_mb_per_s", "poll_before_sleep_us", "inline_copy_kb",
                      "progress_on_loop", "bounce_gather_mapped"}));
}

// --- FromKeyValues / FromText / ToString ---------------------------------------

TEST(ConfigTest, FromKeyValues) {
  const std::vector<std::pair<std::string_view, std::string_view>> good = {
      {"bounce_size_mb", "128"}, {"path", "bounce"}, {"num_workers", "2"}};
  Result<Config> config = Config::FromKeyValues(good);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->bounce_size_mb, 128);
  EXPECT_EQ(config->path, TransferPath::kBounce);
  EXPECT_EQ(config->num_workers, 2);

  const std::vector<std::pair<std::string_view, std::string_view>> bad_value = {
      {"num_workers", "2.5"}};
  EXPECT_THAT(Message(Config::FromKeyValues(bad_value).status()), HasSubstr("num_workers"));

  // Every value parses, but the combination is invalid.
  const std::vector<std::pair<std::string_view, std::string_view>> bad_combination = {
      {"path", "bounce"}};
  EXPECT_THAT(Message(Config::FromKeyValues(bad_combination).status()),
              HasSubstr("needs bounce_size_mb > 0"));
}

TEST(ConfigTest, FromText) {
  Result<Config> config = Config::FromText(
      "# staging\n"
      "bounce_size_mb = 512\n"
      "\n"
      "  path=auto  \r\n"
      "reserve-timeout-ms =50");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->bounce_size_mb, 512);
  EXPECT_EQ(config->reserve_timeout_ms, 50);

  Result<Config> bad = Config::FromText("num_workers = 2\nnum_workers = x\n");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(Message(bad.status()), HasSubstr("line 2"));
  EXPECT_THAT(Message(bad.status()), HasSubstr("num_workers = \"x\""));

  Result<Config> no_equals = Config::FromText("num_workers 2\n");
  ASSERT_FALSE(no_equals.ok());
  EXPECT_THAT(Message(no_equals.status()), HasSubstr("line 1"));
  EXPECT_THAT(Message(no_equals.status()), HasSubstr("expected key = value"));

  EXPECT_FALSE(Config::FromText("path = bounce\n").ok());
  EXPECT_TRUE(Config::FromText("").ok());
}

TEST(ConfigTest, ToStringRoundTripsThroughFromText) {
  Config config;
  config.bounce_size_mb = 64;
  config.num_workers = 3;
  config.path = TransferPath::kPerBlock;
  config.transport_op_ns = 4096;
  config.copy_mb_per_s = 20000;
  config.poll_before_sleep_us = 50;
  config.inline_copy_kb = 0;
  config.progress_on_loop = 0;
  config.bounce_gather_mapped = 0;
  const std::string text = config.ToString();
  EXPECT_EQ(text,
            "bounce_size_mb=64 bounce_chunk_mb=0 num_workers=3 transfer_timeout_ms=60000 "
            "reserve_timeout_ms=200 "
            "path=per-block transport_op_ns=4096 transport_mb_per_s=0 copy_run_ns=0 "
            "copy_mb_per_s=20000 poll_before_sleep_us=50 inline_copy_kb=0 "
            "progress_on_loop=0 bounce_gather_mapped=0");
  std::string lines = text;
  for (char& c : lines) {
    if (c == ' ') c = '\n';
  }
  Result<Config> parsed = Config::FromText(lines);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(*parsed, config);
}

// --- ApplyEnvironment ----------------------------------------------------------------

// Captures every log line for the test's duration.
class EnvTest : public ::testing::Test {
 protected:
  void SetUp() override {
    previous_level_ = MinLogLevel();
    SetMinLogLevel(LogLevel::kDebug);
    previous_sink_ = SetLogSink([this](LogLevel level, std::string_view message) {
      std::lock_guard<std::mutex> lock(mu_);
      lines_.emplace_back(level, std::string(message));
    });
  }
  void TearDown() override {
    SetLogSink(previous_sink_);
    SetMinLogLevel(previous_level_);
  }

  std::vector<std::string> Lines(LogLevel level) {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::string> out;
    for (const auto& [l, m] : lines_) {
      if (l == level) out.push_back(m);
    }
    return out;
  }

  static EnvLookup Env(std::optional<std::string> num_workers) {
    return [value = std::move(num_workers)](const char* name) -> const char* {
      if (std::string_view(name) == "KVBOUNCE_NUM_WORKERS" && value) return value->c_str();
      return nullptr;
    };
  }

 private:
  std::mutex mu_;
  std::vector<std::pair<LogLevel, std::string>> lines_;
  LogSink previous_sink_;
  LogLevel previous_level_ = LogLevel::kWarning;
};

TEST_F(EnvTest, ValidValuesOverrideNumWorkers) {
  Config config;
  config.bounce_size_mb = 16;
  for (const auto& [text, expected] :
       std::vector<std::pair<std::string, int64_t>>{{"1", 1}, {"4", 4}, {"256", 256}, {"08", 8}}) {
    const Config applied = ApplyEnvironment(config, Env(text));
    EXPECT_EQ(applied.num_workers, expected) << text;
    EXPECT_EQ(applied.bounce_size_mb, 16);
  }
  EXPECT_TRUE(Lines(LogLevel::kWarning).empty());
}

TEST_F(EnvTest, UnsetChangesNothingSilently) {
  Config config;
  config.num_workers = 3;
  EXPECT_EQ(ApplyEnvironment(config, Env(std::nullopt)), config);
  EXPECT_TRUE(Lines(LogLevel::kWarning).empty());
}

TEST_F(EnvTest, InvalidValuesAreIgnoredWithAWarning) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"0", ""},
      {"-3", ""},
      {"abc", "not an integer"},
      {"2.5", "not an integer"},
      {"", "not an integer"},
      {" 2", "not an integer"},
      {"257", ""},
      {"99999999999999999999", "out of the 64-bit integer range"},
  };
  Config config;
  config.num_workers = 2;
  for (const auto& [text, why] : cases) {
    SCOPED_TRACE("KVBOUNCE_NUM_WORKERS=\"" + text + "\"");
    const size_t before = Lines(LogLevel::kWarning).size();
    const Config applied = ApplyEnvironment(config, Env(text));
    EXPECT_EQ(applied, config);
    const std::vector<std::string> warnings = Lines(LogLevel::kWarning);
    ASSERT_EQ(warnings.size(), before + 1);
    const std::string& warning = warnings.back();
    EXPECT_THAT(warning, HasSubstr("KVBOUNCE_NUM_WORKERS = \"" + text + "\" is ignored"));
    EXPECT_THAT(warning, HasSubstr("must be an integer >= 1"));
    EXPECT_THAT(warning, HasSubstr(why));
    EXPECT_THAT(warning, HasSubstr("num_workers stays 2"));
  }
}

TEST_F(EnvTest, ReadsTheRealProcessEnvironment) {
  const char* saved = std::getenv("KVBOUNCE_NUM_WORKERS");
  const std::optional<std::string> previous =
      saved ? std::optional<std::string>(saved) : std::nullopt;

  ASSERT_EQ(setenv("KVBOUNCE_NUM_WORKERS", "6", 1), 0);
  EXPECT_EQ(ApplyEnvironment(Config()).num_workers, 6);

  ASSERT_EQ(setenv("KVBOUNCE_NUM_WORKERS", "-1", 1), 0);
  EXPECT_EQ(ApplyEnvironment(Config()).num_workers, 1);
  ASSERT_FALSE(Lines(LogLevel::kWarning).empty());
  EXPECT_THAT(Lines(LogLevel::kWarning).back(), HasSubstr("KVBOUNCE_NUM_WORKERS = \"-1\""));

  ASSERT_EQ(unsetenv("KVBOUNCE_NUM_WORKERS"), 0);
  const size_t warnings = Lines(LogLevel::kWarning).size();
  EXPECT_EQ(ApplyEnvironment(Config()).num_workers, 1);
  EXPECT_EQ(Lines(LogLevel::kWarning).size(), warnings);

  if (previous) setenv("KVBOUNCE_NUM_WORKERS", previous->c_str(), 1);
}

}  // namespace
}  // namespace kvbounce
