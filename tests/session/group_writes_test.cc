// GroupWrites / GroupReads (session/session_context.h): a plan list split
// into one batch of ops per (source region, target region) pair, in list
// order, every op exactly its fragment; a fragment outside every region is
// an error naming it.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <memory>
#include <vector>

#include "common/status_matchers.h"
#include "session/session_context.h"

namespace kvbounce {
namespace {

using ::testing::HasSubstr;
using testing_util::IsOk;
using testing_util::StatusIs;

class FakeRemote final : public RemoteRegion {
 public:
  FakeRemote(uint64_t address, uint64_t size) {
    info_.address = Addr(address);
    info_.size = size;
  }
  PeerId peer() const override { return PeerId(1); }
  const RegionInfo& info() const override { return info_; }
  Addr mapped_address() const override { return Addr(); }

 private:
  RegionInfo info_;
};

// Only the address of a LocalRegion matters to the grouping.
const LocalRegion* FakeLocal(int i) {
  return reinterpret_cast<const LocalRegion*>(uintptr_t{16} * (i + 1));
}

struct Regions {
  std::vector<LocalRange> local = {{Addr(0x1000), 0x1000, FakeLocal(0)},
                                   {Addr(0x4000), 0x800, FakeLocal(1)}};
  std::vector<std::unique_ptr<RemoteRegion>> remote;
  Regions() {
    remote.push_back(std::make_unique<FakeRemote>(0x10000, 0x1000));
    remote.push_back(std::make_unique<FakeRemote>(0x20000, 0x100));
  }
};

TEST(GroupWritesTest, SplitsByRegionPairInListOrder) {
  Regions r;
  // Offsets on the target side are added (a recv slot's base).
  const std::vector<Fragment> fragments = {
      {0x1000, 0x0, 16},     // local 0 -> remote 0
      {0x1ff0, 0x10, 16},    // same pair, up to the local range's end
      {0x4000, 0x10000, 8},  // local 1 -> remote 1 (dst 0x20000)
      {0x4010, 0x100f8, 8},  // same pair, the remote region's last 8 bytes
      {0x1100, 0x20, 0},     // a zero-byte op stays in its place
      {0x1200, 0x30, 32},    // back to local 0 -> remote 0: a new group
  };
  auto groups = GroupWrites(fragments, 0x10000, r.local, r.remote);
  ASSERT_THAT(groups, IsOk());
  ASSERT_EQ(groups->size(), 3u);
  EXPECT_EQ((*groups)[0].source, r.local[0].region);
  EXPECT_EQ((*groups)[0].target, r.remote[0].get());
  EXPECT_EQ((*groups)[1].source, r.local[1].region);
  EXPECT_EQ((*groups)[1].target, r.remote[1].get());
  EXPECT_EQ((*groups)[2].source, r.local[0].region);
  EXPECT_EQ((*groups)[2].target, r.remote[0].get());
  std::vector<size_t> sizes;
  std::vector<Fragment> back;
  for (const WriteGroup& g : *groups) {
    sizes.push_back(g.ops.size());
    for (const WriteOp& op : g.ops) {
      back.push_back(Fragment{op.src.value(), op.dst.value() - 0x10000, op.bytes});
    }
  }
  EXPECT_EQ(sizes, (std::vector<size_t>{2, 2, 2}));
  ASSERT_EQ(back.size(), fragments.size());
  for (size_t i = 0; i < back.size(); ++i) {
    EXPECT_EQ(back[i].src, fragments[i].src) << i;
    EXPECT_EQ(back[i].dst, fragments[i].dst) << i;
    EXPECT_EQ(back[i].bytes, fragments[i].bytes) << i;
  }
}

TEST(GroupWritesTest, AnEmptyListHasNoGroups) {
  Regions r;
  auto groups = GroupWrites({}, 0, r.local, r.remote);
  ASSERT_THAT(groups, IsOk());
  EXPECT_TRUE(groups->empty());
}

TEST(GroupWritesTest, AFragmentOutsideEveryRegionIsNamed) {
  Regions r;
  // Straddles the end of local range 0.
  std::vector<Fragment> fragments = {{0x1000, 0x0, 16}, {0x1ff8, 0x20, 16}};
  EXPECT_THAT(GroupWrites(fragments, 0x10000, r.local, r.remote),
              StatusIs(StatusCode::kOutOfRange,
                       HasSubstr("fragment 1 (16 bytes) lies outside the registered source")));
  // Past remote region 1's end (0x20100).
  fragments = {{0x4000, 0x100f8, 16}};
  EXPECT_THAT(GroupWrites(fragments, 0x10000, r.local, r.remote),
              StatusIs(StatusCode::kOutOfRange,
                       HasSubstr("fragment 0 (16 bytes) lies outside the registered target")));
  // Between the regions.
  fragments = {{0x3000, 0x0, 1}};
  EXPECT_THAT(GroupWrites(fragments, 0x10000, r.local, r.remote),
              StatusIs(StatusCode::kOutOfRange, HasSubstr("source")));
}

TEST(GroupReadsTest, SourcesArePeerRegionsTargetsLocalRanges) {
  Regions r;
  const std::vector<Fragment> fragments = {
      {0x20000, 0x4000, 0x100},  // remote 1 -> local 1
      {0x10000, 0x1000, 0x10},   // remote 0 -> local 0
      {0x10010, 0x1010, 0x10},
  };
  auto groups = GroupReads(fragments, r.remote, r.local);
  ASSERT_THAT(groups, IsOk());
  ASSERT_EQ(groups->size(), 2u);
  EXPECT_EQ((*groups)[0].source, r.remote[1].get());
  EXPECT_EQ((*groups)[0].target, r.local[1].region);
  ASSERT_EQ((*groups)[0].ops.size(), 1u);
  EXPECT_EQ((*groups)[0].ops[0].bytes, 0x100u);
  EXPECT_EQ((*groups)[1].source, r.remote[0].get());
  ASSERT_EQ((*groups)[1].ops.size(), 2u);
  EXPECT_EQ((*groups)[1].ops[1].src, Addr(0x10010));
  EXPECT_EQ((*groups)[1].ops[1].dst, Addr(0x1010));
  EXPECT_THAT(GroupReads(std::vector<Fragment>{{0x30000, 0x1000, 1}}, r.remote, r.local),
              StatusIs(StatusCode::kOutOfRange, HasSubstr("source")));
}

}  // namespace
}  // namespace kvbounce
