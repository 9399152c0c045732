// `kvbounce sweep` in-process on a tiny shape: CSV and JSON with one row per
// point and path, every run verified, the ceiling measured; the plot as a
// valid PNG and SVG (skipped only where matplotlib is missing); the axis
// applied to the right flag; bad axes and values refused with the reason.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "common/status_matchers.h"
#include "tools/cli.h"
#include "tools/sweep_command.h"

namespace kvbounce::tools {
namespace {

using ::testing::HasSubstr;
using testing_util::StatusIs;

std::string Slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

struct CliResult {
  int status = 0;
  std::string out, err;
};

CliResult Cli(std::vector<std::string> args) {
  args.insert(args.begin(), "kvbounce");
  std::vector<const char*> argv;
  for (const std::string& a : args) argv.push_back(a.c_str());
  std::ostringstream out, err;
  CliResult r;
  r.status = RunCli(static_cast<int>(argv.size()), argv.data(), out, err);
  r.out = out.str();
  r.err = err.str();
  return r;
}

std::vector<std::string> Tiny(const std::string& prefix) {
  return {"sweep",      "--axis",     "tokens",     "--values", "32,128", "--layers", "2",
          "--kv-heads", "4",          "--head-dim", "16",       "--ctx",  "tp=4",     "--gen",
          "tp=2",       "--requests", "3",          "--out",    prefix,   "--quiet"};
}

std::vector<std::vector<std::string>> CsvRows(const std::string& text) {
  std::vector<std::vector<std::string>> rows;
  std::stringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    std::vector<std::string> fields;
    std::string field;
    bool quoted = false;
    for (size_t i = 0; i < line.size(); ++i) {
      const char c = line[i];
      if (quoted) {
        if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
          field += '"';
          ++i;
        } else if (c == '"') {
          quoted = false;
        } else {
          field += c;
        }
      } else if (c == '"') {
        quoted = true;
      } else if (c == ',') {
        fields.push_back(field);
        field.clear();
      } else {
        field += c;
      }
    }
    fields.push_back(field);
    rows.push_back(fields);
  }
  return rows;
}

TEST(SweepTest, TinySweepWritesOneVerifiedRowPerPointAndPath) {
  const std::string prefix = ::testing::TempDir() + "kvbounce_sweep_" + std::to_string(getpid());
  std::vector<std::string> args = Tiny(prefix);
  args.push_back("--no-plot");
  const CliResult r = Cli(args);
  ASSERT_EQ(r.status, 0) << r.err << r.out;
  EXPECT_EQ(r.err, "");  // --quiet: no progress

  const nlohmann::json j = nlohmann::json::parse(Slurp(prefix + ".json"), nullptr, false);
  ASSERT_FALSE(j.is_discarded());
  EXPECT_EQ(j["axis"], "tokens");
  EXPECT_TRUE(j["passed"].get<bool>());
  EXPECT_GT(j["ceiling"]["gbps"].get<double>(), 0);
  const std::vector<std::string> paths = {"per-block", "bounce", "direct", "auto"};
  ASSERT_EQ(j["rows"].size(), 2 * paths.size());
  for (size_t i = 0; i < j["rows"].size(); ++i) {
    const nlohmann::json& row = j["rows"][i];
    EXPECT_EQ(row["value"], i < paths.size() ? 32 : 128);
    EXPECT_EQ(row["path"], paths[i % paths.size()]);
    EXPECT_TRUE(row["verified"].get<bool>()) << row;
    EXPECT_EQ(row["completed"], 3);
    EXPECT_EQ(row["verified_bytes"], row["bytes"]);
    EXPECT_GT(row["bytes"].get<uint64_t>(), 0u);
    // Host pools: each run's ceiling is its own requests' fragments copied
    // plainly right after each of its waves (the bench's paired ceiling).
    EXPECT_GT(row["ceiling_gbps"].get<double>(), 0);
    EXPECT_NEAR(row["fraction_of_ceiling"].get<double>(),
                row["throughput_gbps"].get<double>() / row["ceiling_gbps"].get<double>(), 1e-9);
  }
  // The bytes follow the axis: four times the tokens, four times the bytes.
  EXPECT_EQ(j["rows"][4]["bytes"].get<uint64_t>(), 4 * j["rows"][0]["bytes"].get<uint64_t>());

  const auto csv = CsvRows(Slurp(prefix + ".csv"));
  ASSERT_EQ(csv.size(), 1 + 2 * paths.size());
  const std::vector<std::string>& header = csv[0];
  auto col = [&](const std::string& name) {
    return static_cast<size_t>(std::find(header.begin(), header.end(), name) - header.begin());
  };
  ASSERT_LT(col("scenario"), header.size());
  for (size_t i = 1; i < csv.size(); ++i) {
    ASSERT_EQ(csv[i].size(), header.size()) << i;
    EXPECT_EQ(csv[i][col("path")], paths[(i - 1) % paths.size()]);
    EXPECT_EQ(csv[i][col("verified")], "true");
    EXPECT_EQ(csv[i][col("value")], i <= paths.size() ? "32" : "128");
    EXPECT_THAT(csv[i][col("scenario")], HasSubstr("ctx tp4"));
  }
  EXPECT_THAT(r.out, HasSubstr("tokens=128:"));
  std::remove((prefix + ".csv").c_str());
  std::remove((prefix + ".json").c_str());
}

TEST(SweepTest, PlotIsAValidPngAndSvg) {
  if (std::system("/usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "no matplotlib for /usr/bin/python3 (Debian: python3-matplotlib)";
  }
  const std::string prefix =
      ::testing::TempDir() + "kvbounce_sweep_plot_" + std::to_string(getpid());
  std::vector<std::string> args = Tiny(prefix);
  const CliResult r = Cli(args);
  ASSERT_EQ(r.status, 0) << r.err << r.out;
  const std::string png = Slurp(prefix + ".png");
  ASSERT_GT(png.size(), 1000u);
  EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  const std::string svg = Slurp(prefix + ".svg");
  EXPECT_THAT(svg, HasSubstr("<svg"));
  EXPECT_THAT(svg, HasSubstr("</svg>"));
  for (const char* ext : {".csv", ".json", ".png", ".svg"}) std::remove((prefix + ext).c_str());
}

TEST(SweepTest, AxisValuesSetTheirFlagAndBadOnesAreRefused) {
  SweepFlags f;
  f.axis = "ctx-tp";
  f.values = "1,2,8";
  f.bench.scenario.ctx = "pp=1,tp=8,layout=layer-major-nhd";
  Result<std::vector<SweepPoint>> points = PlanSweep(f);
  ASSERT_TRUE(points.ok()) << points.status();
  ASSERT_EQ(points->size(), 3u);
  EXPECT_EQ((*points)[1].bench.scenario.ctx, "pp=1,tp=2,layout=layer-major-nhd");
  f.axis = "arena-mb";
  f.values = "4";
  points = PlanSweep(f);
  ASSERT_TRUE(points.ok()) << points.status();
  EXPECT_EQ((*points)[0].bench.bounce_size_mb, 4);
  f.axis = "fragment";
  f.values = "8";
  points = PlanSweep(f);
  ASSERT_TRUE(points.ok()) << points.status();
  EXPECT_EQ((*points)[0].bench.scenario.tokens_per_block, 8);

  for (const auto& [axis, values, why] :
       std::vector<std::tuple<std::string, std::string, std::string>>{
           {"speed", "1", "--axis 'speed' is unknown"},
           {"tokens", "", "give a comma list"},
           {"tokens", "64,", "give a comma list"},
           {"tokens", "64,64", "repeated"},
           {"tokens", "0", "out of range"},
           {"concurrency", "2000", "out of range"},
           {"tokens", "1e3", "not an integer"},
           {"ctx-tp", "3", "--axis ctx-tp = 3"}}) {
    f.axis = axis;
    f.values = values;
    EXPECT_THAT(PlanSweep(f).status(), StatusIs(StatusCode::kInvalidArgument, HasSubstr(why)))
        << axis << " " << values;
  }
}

}  // namespace
}  // namespace kvbounce::tools
