#include "layout/planner.h"

#include <algorithm>
#include <array>
#include <bit>
#include <deque>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

namespace kvbounce {
namespace {

// Coordinates a walk tracks: sender address, receiver address, packed offset.
enum Coord : int { kSrc = 0, kDst = 1, kPacked = 2 };

// One dimension of the walk. The offset of index i along coordinate c is
// table[c][i] when a table is given (per-layer pool bases), else i*stride[c].
struct Axis {
  int64_t extent = 1;
  std::array<uint64_t, 3> stride = {0, 0, 0};
  std::array<const uint64_t*, 3> table = {nullptr, nullptr, nullptr};

  uint64_t Offset(int c, int64_t i) const {
    return table[c] != nullptr ? table[c][i] : static_cast<uint64_t>(i) * stride[c];
  }
};

// A piece of the token range inside one sender block and one receiver block.
struct Segment {
  int64_t tokens = 0;                          // tokens in the segment
  int64_t block_tokens = 0;                    // tokens of its receiver block inside the range
  std::array<uint64_t, 3> offset = {0, 0, 0};  // of its first row, per coordinate
};

// Collects a list's runs, merging each with the one before when they are
// adjacent on both sides.
class FragmentSink {
 public:
  explicit FragmentSink(FragmentList* out) : out_(out) {}
  void Add(uint64_t x, uint64_t y, uint64_t bytes) {
    if (!out_->empty()) {
      Fragment& last = out_->back();
      if (last.src + last.bytes == x && last.dst + last.bytes == y) {
        last.bytes += bytes;
        return;
      }
    }
    out_->push_back(Fragment{x, y, bytes});
  }
  // Add(x + i*sx, y + i*sy, bytes) for i in [0, n). REQUIRES: no two
  // consecutive runs of the series are adjacent on both sides (sx or sy is
  // not `bytes`), so only the first may merge with the run before it.
  void AddSeries(uint64_t x, uint64_t y, uint64_t bytes, uint64_t sx, uint64_t sy, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      Add(x, y, bytes);
      x += sx;
      y += sy;
    }
  }

 private:
  FragmentList* out_;
};

// What a walk of one segment shape adds to a list, relative to the
// segment's offsets: its runs (after merging), where the first starts and
// where the last ends, on both coordinates. Counting composes these instead
// of visiting every run (CountingSink::AddSummary).
struct RunSummary {
  uint64_t runs = 0;
  uint64_t first_x = 0, first_y = 0;
  uint64_t end_x = 0, end_y = 0;
};

// Counts the runs FragmentSink would collect, storing none.
class CountingSink {
 public:
  // Walks stop early once `limit` runs are counted (WalkOuter checks full()).
  explicit CountingSink(uint64_t limit = std::numeric_limits<uint64_t>::max()) : limit_(limit) {}
  void Add(uint64_t x, uint64_t y, uint64_t bytes) {
    AddSummary(x, y, RunSummary{1, 0, 0, bytes, bytes});
  }
  // A walk summarized by `s`, at offsets (x, y): its first run merges with
  // the run before it exactly when FragmentSink would merge them.
  void AddSummary(uint64_t x, uint64_t y, const RunSummary& s) {
    if (s.runs == 0) return;
    const bool merges = runs_ > 0 && end_x_ == x + s.first_x && end_y_ == y + s.first_y;
    runs_ += s.runs - (merges ? 1 : 0);
    end_x_ = x + s.end_x;
    end_y_ = y + s.end_y;
  }
  uint64_t runs() const { return runs_; }
  bool full() const { return runs_ >= limit_; }

 private:
  uint64_t end_x_ = 0, end_y_ = 0;
  uint64_t runs_ = 0;
  uint64_t limit_;
};

template <int X, int Y, typename Sink>
void WalkAxes(const Axis* axes, int n, uint64_t x, uint64_t y, uint64_t chunk, Sink& sink) {
  const Axis& a = axes[0];
  if (n == 1 && a.table[X] == nullptr && a.table[Y] == nullptr) {
    // The innermost axis left after BuildShape coalesced every axis that is
    // contiguous on both sides: its steps never merge with each other.
    sink.AddSeries(x, y, chunk, a.stride[X], a.stride[Y], a.extent);
    return;
  }
  for (int64_t i = 0; i < a.extent; ++i) {
    const uint64_t xi = x + a.Offset(X, i);
    const uint64_t yi = y + a.Offset(Y, i);
    if (n == 1) {
      sink.Add(xi, yi, chunk);
    } else {
      WalkAxes<X, Y, Sink>(axes + 1, n - 1, xi, yi, chunk, sink);
    }
  }
}

// Everything a plan's passes share.
struct Walk {
  uint64_t row_bytes = 0;
  std::array<uint64_t, 3> origin = {0, 0, 0};
  std::vector<Axis> outer;          // receiver-order dims outside the block
  std::vector<PoolDim> inner_dims;  // receiver-order dims inside the block
  std::array<Axis, 5> dim_axis;     // per PoolDim, strides for kSrc/kDst
  std::vector<Segment> segments;
  uint64_t block_row_bytes = 0;  // packed bytes per token of a block
};

// How one list walks a segment of a given shape: the axes left after
// coalescing and the contiguous bytes each innermost step copies. Segments
// of the same shape (every full block, typically) share one.
struct SegmentShape {
  int64_t tokens = 0;
  int64_t block_tokens = 0;
  uint64_t x = 0, y = 0;  // offsets of the folded extent-1 axes
  uint64_t chunk = 0;
  int num_axes = 0;
  std::array<Axis, 4> axes;
  RunSummary summary;  // of WalkAxes over `axes` from (0, 0)
};

// The RunSummary of WalkAxes<X, Y>(axes, n, 0, 0, chunk): an axis repeats
// the walk inside it at a stride (or at its table's offsets), and each
// repeat's first run merges with the one before's last exactly when the
// last ends where the first starts, on both coordinates; with a stride
// that holds for every repeat or for none.
template <int X, int Y>
RunSummary SummarizeAxes(const Axis* axes, int n, uint64_t chunk) {
  if (n == 0) return RunSummary{1, 0, 0, chunk, chunk};
  const RunSummary in = SummarizeAxes<X, Y>(axes + 1, n - 1, chunk);
  const Axis& a = axes[0];
  if (a.extent <= 0) return RunSummary{};
  const auto e = static_cast<uint64_t>(a.extent);
  if (a.table[X] == nullptr && a.table[Y] == nullptr) {
    const bool merges =
        in.end_x == in.first_x + a.stride[X] && in.end_y == in.first_y + a.stride[Y];
    return RunSummary{e * in.runs - (merges ? e - 1 : 0), in.first_x, in.first_y,
                      in.end_x + (e - 1) * a.stride[X], in.end_y + (e - 1) * a.stride[Y]};
  }
  RunSummary out{in.runs, in.first_x + a.Offset(X, 0), in.first_y + a.Offset(Y, 0),
                 in.end_x + a.Offset(X, 0), in.end_y + a.Offset(Y, 0)};
  for (int64_t i = 1; i < a.extent; ++i) {
    const uint64_t ox = a.Offset(X, i);
    const uint64_t oy = a.Offset(Y, i);
    const bool merges = out.end_x == in.first_x + ox && out.end_y == in.first_y + oy;
    out.runs += in.runs - (merges ? 1 : 0);
    out.end_x = in.end_x + ox;
    out.end_y = in.end_y + oy;
  }
  return out;
}

// A segment as one list sees it: its offsets on the list's two coordinates.
struct SegmentRef {
  uint64_t x = 0, y = 0;
  const SegmentShape* shape = nullptr;
};

// Builds the shape of a segment for the list (X, Y): packed strides for its
// receiver block, extent-1 axes folded into offsets, and the innermost axes
// that are contiguous on both X and Y coalesced into the chunk.
template <int X, int Y>
SegmentShape BuildShape(const Walk& w, const Segment& seg) {
  SegmentShape shape;
  shape.tokens = seg.tokens;
  shape.block_tokens = seg.block_tokens;
  std::array<Axis, 4> axes;
  const int n = static_cast<int>(w.inner_dims.size());
  uint64_t packed = w.row_bytes;
  for (int i = n - 1; i >= 0; --i) {
    const PoolDim d = w.inner_dims[static_cast<size_t>(i)];
    Axis a = w.dim_axis[static_cast<size_t>(d)];
    if (d == PoolDim::kToken) a.extent = seg.tokens;
    a.stride[kPacked] = packed;
    packed *= static_cast<uint64_t>(d == PoolDim::kToken ? seg.block_tokens : a.extent);
    axes[static_cast<size_t>(i)] = a;
  }
  int kept = 0;
  for (int i = 0; i < n; ++i) {
    const Axis& a = axes[static_cast<size_t>(i)];
    if (a.extent == 1) {
      shape.x += a.Offset(X, 0);
      shape.y += a.Offset(Y, 0);
    } else {
      axes[static_cast<size_t>(kept++)] = a;
    }
  }
  uint64_t chunk = w.row_bytes;
  while (kept > 0) {
    const Axis& a = axes[static_cast<size_t>(kept - 1)];
    if (a.table[X] != nullptr || a.table[Y] != nullptr || a.stride[X] != chunk ||
        a.stride[Y] != chunk) {
      break;
    }
    chunk *= static_cast<uint64_t>(a.extent);
    --kept;
  }
  shape.chunk = chunk;
  shape.num_axes = kept;
  shape.axes = axes;
  shape.summary = SummarizeAxes<X, Y>(shape.axes.data(), kept, chunk);
  return shape;
}

template <int X, int Y, typename Sink>
void WalkOuter(const Walk& w, const std::vector<SegmentRef>& segs, size_t level, uint64_t x,
               uint64_t y, Sink& sink) {
  if (level == w.outer.size()) {
    for (const SegmentRef& s : segs) {
      const SegmentShape& shape = *s.shape;
      if constexpr (std::is_same_v<Sink, CountingSink>) {
        if (sink.full()) return;
        sink.AddSummary(x + s.x, y + s.y, shape.summary);
      } else if (shape.num_axes == 0) {
        sink.Add(x + s.x, y + s.y, shape.chunk);
      } else {
        WalkAxes<X, Y, Sink>(shape.axes.data(), shape.num_axes, x + s.x, y + s.y, shape.chunk,
                             sink);
      }
    }
    return;
  }
  const Axis& a = w.outer[level];
  for (int64_t i = 0; i < a.extent; ++i) {
    if constexpr (std::is_same_v<Sink, CountingSink>) {
      if (sink.full()) return;
    }
    WalkOuter<X, Y, Sink>(w, segs, level + 1, x + a.Offset(X, i), y + a.Offset(Y, i), sink);
  }
}

// Walks the list (X, Y) into `sink`.
template <int X, int Y, typename Sink>
void WalkList(const Walk& w, Sink& sink) {
  // Few distinct shapes exist (full blocks, the range's partial first and
  // last blocks, blocks cut by the other side's block edges); a deque keeps
  // pointers to them stable.
  std::deque<SegmentShape> shapes;
  std::map<std::pair<int64_t, int64_t>, const SegmentShape*> by_size;
  std::vector<SegmentRef> segs(w.segments.size());
  const SegmentShape* last = nullptr;
  for (size_t i = 0; i < segs.size(); ++i) {
    const Segment& seg = w.segments[i];
    if (last == nullptr || last->tokens != seg.tokens || last->block_tokens != seg.block_tokens) {
      const SegmentShape*& found = by_size[{seg.tokens, seg.block_tokens}];
      if (found == nullptr) found = &shapes.emplace_back(BuildShape<X, Y>(w, seg));
      last = found;
    }
    segs[i] = SegmentRef{seg.offset[X] + last->x, seg.offset[Y] + last->y, last};
  }
  WalkOuter<X, Y, Sink>(w, segs, 0, w.origin[X], w.origin[Y], sink);
}

template <int X, int Y>
void EmitKvList(const Walk& w, FragmentList* out) {
  FragmentSink sink(out);
  WalkList<X, Y>(w, sink);
}

// The outer indices' offsets, origin included, in walk order.
template <int X, int Y>
void FlattenOuter(const Walk& w, size_t level, uint64_t x, uint64_t y,
                  std::vector<TileOffset>* out) {
  if (level == w.outer.size()) {
    out->push_back(TileOffset{x, y});
    return;
  }
  const Axis& a = w.outer[level];
  for (int64_t i = 0; i < a.extent; ++i) {
    FlattenOuter<X, Y>(w, level + 1, x + a.Offset(X, i), y + a.Offset(Y, i), out);
  }
}

// The list (X, Y) in tiled form: WalkList's three loops kept apart.
template <int X, int Y>
void EmitKvTiled(const Walk& w, TiledList* out) {
  std::map<std::pair<int64_t, int64_t>, uint64_t> by_size;  // -> index into out->shapes
  std::vector<SegmentShape> built;
  FragmentList runs;
  out->segments.reserve(w.segments.size());
  for (const Segment& seg : w.segments) {
    auto [it, added] = by_size.try_emplace({seg.tokens, seg.block_tokens}, built.size());
    if (added) {
      const SegmentShape shape = BuildShape<X, Y>(w, seg);
      runs.clear();
      FragmentSink sink(&runs);
      if (shape.num_axes == 0) {
        sink.Add(0, 0, shape.chunk);
      } else {
        WalkAxes<X, Y>(shape.axes.data(), shape.num_axes, 0, 0, shape.chunk, sink);
      }
      TileShape tile{out->runs.size(), runs.size(), 0};
      for (const Fragment& f : runs) {
        tile.bytes += f.bytes;
        out->runs.push_back(f);
      }
      out->shapes.push_back(tile);
      built.push_back(shape);
    }
    const SegmentShape& shape = built[it->second];
    out->segments.push_back(
        TileSegment{seg.offset[X] + shape.x, seg.offset[Y] + shape.y, it->second});
  }
  FlattenOuter<X, Y>(w, 0, w.origin[X], w.origin[Y], &out->outer);
}

// A hash of 64-bit words, MurmurHash3's 64-bit block step (public domain):
// each word is mixed in whole (multiply, rotate,
// multiply: a handful of instructions a word, not eight byte steps), the
// result finished with a 64-bit avalanche. Not cryptographic: it tells two
// honest sides that disagree apart, nothing more.
class Fingerprint {
 public:
  void Add(uint64_t v) {
    v *= 0x87c37b91114253d5ULL;
    v = std::rotl(v, 31);
    v *= 0x4cf5ad432745937fULL;
    h_ ^= v;
    h_ = std::rotl(h_, 27) * 5 + 0x52dce729;
  }
  void AddLayout(const PoolLayout& p, const RankPlacement& r) {
    const PoolGeometry& g = p.geometry();
    for (uint64_t v :
         {uint64_t{static_cast<uint8_t>(p.kind())}, uint64_t(g.num_layers), uint64_t(g.kv_factor),
          uint64_t(g.num_heads), uint64_t(g.tokens_per_block), uint64_t(g.head_dim),
          uint64_t(g.elem_bytes), uint64_t(g.num_blocks), uint64_t(p.per_layer_bases()),
          uint64_t(r.rank), uint64_t(r.tp_rank), uint64_t(r.tp_size), uint64_t(r.pp_rank),
          uint64_t(r.pp_size), uint64_t(r.first_layer), uint64_t(r.first_head)}) {
      Add(v);
    }
  }
  uint64_t Finish() const {
    uint64_t z = h_;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }

 private:
  uint64_t h_ = 0xcbf29ce484222325ULL;
};

Status CheckSide(const PlanSide& side, const char* role, RankPlacement* placement) {
  if (side.topology == nullptr || side.pool == nullptr) {
    return InvalidArgumentError(std::string(role) + ": topology and pool are required");
  }
  Result<RankPlacement> p = side.topology->CheckedPlacement(side.rank);
  if (!p.ok()) return p.status().WithContext(role);
  const InstanceSpec& spec = side.topology->spec();
  const PoolGeometry& g = side.pool->geometry();
  if (side.pool->kind() != spec.layout || g.num_layers != p->num_layers ||
      g.num_heads != p->num_heads || g.kv_factor != spec.model.kv_factor ||
      g.tokens_per_block != spec.tokens_per_block || g.head_dim != spec.model.head_dim ||
      g.elem_bytes != side.topology->elem_bytes()) {
    return InvalidArgumentError(
        std::string(role) + " rank " + std::to_string(side.rank) + ": pool (" +
        std::string(LayoutKindName(side.pool->kind())) + ", " + std::to_string(g.num_layers) +
        " layers, " + std::to_string(g.num_heads) + " heads, " +
        std::to_string(g.tokens_per_block) + " tokens/block) does not match the rank (" +
        std::string(LayoutKindName(spec.layout)) + ", " + std::to_string(p->num_layers) +
        " layers, " + std::to_string(p->num_heads) + " heads, " +
        std::to_string(spec.tokens_per_block) + " tokens/block)");
  }
  *placement = *p;
  return Status::Ok();
}

Status CheckBlockTable(const PlanSide& side, const char* role, TokenRange tokens) {
  const int64_t t = side.pool->geometry().tokens_per_block;
  const int64_t first = tokens.start / t;
  const int64_t needed = (tokens.end + t - 1) / t;
  const int64_t have = static_cast<int64_t>(side.block_table.size());
  if (have < needed) {
    return OutOfRangeError(std::string(role) + " rank " + std::to_string(side.rank) +
                           ": token range [" + std::to_string(tokens.start) + ", " +
                           std::to_string(tokens.end) + ") needs " + std::to_string(needed) +
                           " blocks of " + std::to_string(t) + " tokens but the block table has " +
                           std::to_string(have));
  }
  const int64_t capacity = side.pool->geometry().num_blocks;
  for (int64_t i = first; i < needed; ++i) {
    const int32_t id = side.block_table[static_cast<size_t>(i)];
    if (id < 0 || id >= capacity) {
      return OutOfRangeError(std::string(role) + " rank " + std::to_string(side.rank) +
                             ": block table entry " + std::to_string(i) + " = " +
                             std::to_string(id) + " is outside the pool of " +
                             std::to_string(capacity) + " blocks");
    }
  }
  return Status::Ok();
}

// Offsets of each box layer of one side, when that side's layers have bases of
// their own (absolute addresses; the origin then carries no layer part).
std::vector<uint64_t> LayerTable(const PoolLayout& pool, int first_local, int count) {
  std::vector<uint64_t> table(static_cast<size_t>(count));
  for (int i = 0; i < count; ++i)
    table[static_cast<size_t>(i)] = pool.layer_base(first_local + i).value();
  return table;
}

}  // namespace

uint64_t PackedBytes(const Box& box, TokenRange tokens, uint64_t row_bytes) {
  if (box.empty() || tokens.size() <= 0) return 0;
  return static_cast<uint64_t>(box.num_layers) * static_cast<uint64_t>(box.kv_factor) *
         static_cast<uint64_t>(box.num_heads) * static_cast<uint64_t>(tokens.size()) * row_bytes;
}

namespace {

// A plan's walk, ready to emit lists from. Walk's axes point into the layer
// tables, so a Prepared is filled in place and never moved.
// One run of a hybrid model's state, on the three coordinates.
struct StateRun {
  std::array<uint64_t, 3> at = {0, 0, 0};
  uint64_t bytes = 0;
};

struct Prepared {
  PairPlan plan;  // everything but the lists
  bool kv = false;  // the box holds KV: walk `w`
  Walk w;
  std::vector<uint64_t> src_layers, dst_layers;
  std::vector<StateRun> state;  // after the KV, in packed order
};

// Checks that `side`'s state pool is the one of its rank and that its
// slot lies in it.
Status CheckStateSide(const PlanSide& side, const char* role, const RankPlacement& p,
                      bool need_slot) {
  const std::string who = std::string(role) + " rank " + std::to_string(side.rank);
  if (side.state_pool == nullptr) {
    return InvalidArgumentError(who + ": the request moves state but the rank has no state pool");
  }
  const StatePoolLayout& sp = *side.state_pool;
  const InstanceSpec& spec = side.topology->spec();
  bool matches = sp.kind() == spec.state_layout && sp.num_layers() == p.num_state_layers;
  size_t i = 0;
  for (const StateTensor& t : spec.model.state) {
    for (const StateSegment& seg : t.segments) {
      const UnitShare share = SegmentShare(seg, p.tp_size, p.tp_rank);
      matches = matches && i < sp.segments().size() && sp.segments()[i].first_unit == share.first &&
                sp.segments()[i].units == share.count &&
                sp.segments()[i].unit_bytes ==
                    static_cast<uint64_t>(seg.unit_elems) * DTypeBytes(t.dtype);
      ++i;
    }
  }
  if (!matches || i != sp.segments().size()) {
    return InvalidArgumentError(
        who + ": state pool (" + std::string(StateLayoutKindName(sp.kind())) + ", " +
        std::to_string(sp.num_layers()) + " recurrent layers) is not the rank's (" +
        std::string(StateLayoutKindName(spec.state_layout)) + ", " +
        std::to_string(p.num_state_layers) + " recurrent layers)");
  }
  if (need_slot && (side.state_slot < 0 || side.state_slot >= sp.num_slots())) {
    return OutOfRangeError(who + ": state slot " + std::to_string(side.state_slot) +
                           " is outside the state pool of " + std::to_string(sp.num_slots()) +
                           " slots");
  }
  return Status::Ok();
}

void PrepareState(const PlanSide& writer, const PlanSide& receiver, const RankPlacement& c,
                  const RankPlacement& g, bool need_src, bool need_dst, uint64_t packed_start,
                  Prepared* out);
void PrepareKv(const PlanSide& writer, const PlanSide& receiver, const RankPlacement& c,
               const RankPlacement& g, TokenRange tokens, bool need_src, bool need_dst,
               bool unknown_writer_table, Prepared* out);

// Checks the sides and builds the walk. `need_src` / `need_dst`: the lists
// to emit touch that side's addresses (its block table must cover the
// range). `unknown_writer_table`: the writer's block table is not known;
// its blocks are given ids that are nowhere adjacent (descending), so no run
// merges across two of them.
Status Prepare(const PlanSide& writer, const PlanSide& receiver, TokenRange tokens, bool need_src,
               bool need_dst, bool unknown_writer_table, Prepared* out) {
  RankPlacement c, g;
  KVB_RETURN_IF_ERROR(CheckSide(writer, "writer", &c));
  KVB_RETURN_IF_ERROR(CheckSide(receiver, "receiver", &g));
  KVB_RETURN_IF_ERROR(CheckCompatible(*writer.topology, *receiver.topology));
  if (tokens.start < 0 || tokens.end <= tokens.start) {
    return InvalidArgumentError("token range [" + std::to_string(tokens.start) + ", " +
                                std::to_string(tokens.end) + ") is invalid: need 0 <= start < end");
  }
  if (need_src && !unknown_writer_table) {
    KVB_RETURN_IF_ERROR(CheckBlockTable(writer, "writer", tokens));
  }
  if (need_dst) KVB_RETURN_IF_ERROR(CheckBlockTable(receiver, "receiver", tokens));

  PairPlan& plan = out->plan;
  plan.writer_rank = writer.rank;
  plan.receiver_rank = receiver.rank;
  plan.tokens = tokens;
  const bool with_state = receiver.state_slot >= 0 && writer.topology->spec().model.hybrid();
  plan.box =
      WriterBox(*writer.topology, writer.rank, *receiver.topology, receiver.rank, with_state);
  const Box& box = plan.box;

  Fingerprint fp;
  fp.AddLayout(*writer.pool, c);
  fp.AddLayout(*receiver.pool, g);
  for (int64_t v : {tokens.start, tokens.end, int64_t{box.first_layer}, int64_t{box.num_layers},
                    int64_t{box.first_head}, int64_t{box.num_heads}, int64_t{box.kv_factor}}) {
    fp.Add(static_cast<uint64_t>(v));
  }
  if (with_state) {
    // The state part as both sides derive it from the topologies.
    for (int64_t v : {int64_t{1}, int64_t{box.first_state_layer}, int64_t{box.num_state_layers},
                      int64_t{c.num_state_layers}, int64_t{g.num_state_layers},
                      int64_t{static_cast<uint8_t>(writer.topology->spec().state_layout)},
                      int64_t{static_cast<uint8_t>(receiver.topology->spec().state_layout)}}) {
      fp.Add(static_cast<uint64_t>(v));
    }
    for (const UnitRange& u : box.state_units) {
      fp.Add(static_cast<uint64_t>(u.first));
      fp.Add(static_cast<uint64_t>(u.count));
    }
  }
  plan.fingerprint = fp.Finish();
  if (box.empty()) return Status::Ok();

  if (!box.state_empty()) {
    if (need_src) {
      KVB_RETURN_IF_ERROR(CheckStateSide(writer, "writer", c, !unknown_writer_table));
    }
    if (need_dst) KVB_RETURN_IF_ERROR(CheckStateSide(receiver, "receiver", g, true));
  }
  plan.packed_bytes = PackedBytes(box, tokens, receiver.pool->row_bytes());
  if (!box.kv_empty())
    PrepareKv(writer, receiver, c, g, tokens, need_src, need_dst, unknown_writer_table, out);
  if (!box.state_empty()) {
    PrepareState(writer, receiver, c, g, need_src, need_dst, plan.packed_bytes, out);
    plan.state_bytes = StateBytes(box, receiver.topology->spec().model);
    plan.packed_bytes += plan.state_bytes;
  }
  return Status::Ok();
}

// The state runs of a box with state, in packed order: per recurrent layer,
// per segment (every tensor's in turn), the units of the box; packed
// offsets from `packed_start` (after the KV).
void PrepareState(const PlanSide& writer, const PlanSide& receiver, const RankPlacement& c,
                  const RankPlacement& g, bool need_src, bool need_dst, uint64_t packed_start,
                  Prepared* out) {
  const Box& box = out->plan.box;
  // The writer's slot is unknown to a receiver that only counts runs.
  const int64_t src_slot = writer.state_slot >= 0 ? writer.state_slot : 0;
  std::vector<uint64_t> unit_bytes;
  for (const StateTensor& t : receiver.topology->spec().model.state) {
    for (const StateSegment& seg : t.segments) {
      unit_bytes.push_back(static_cast<uint64_t>(seg.unit_elems) * DTypeBytes(t.dtype));
    }
  }
  uint64_t packed = packed_start;
  for (int l = 0; l < box.num_state_layers; ++l) {
    const int layer = box.first_state_layer + l;
    for (size_t i = 0; i < box.state_units.size(); ++i) {
      const UnitRange& u = box.state_units[i];
      if (u.count == 0) continue;
      StateRun run;
      run.bytes = unit_bytes[i] * static_cast<uint64_t>(u.count);
      if (need_src) {
        const StatePoolLayout::Segment& seg = writer.state_pool->segments()[i];
        run.at[kSrc] =
            writer.state_pool->TensorAddress(layer - c.first_state_layer, seg.tensor, src_slot)
                .value() +
            seg.offset + static_cast<uint64_t>(u.first - seg.first_unit) * seg.unit_bytes;
      }
      if (need_dst) {
        const StatePoolLayout::Segment& seg = receiver.state_pool->segments()[i];
        run.at[kDst] =
            receiver.state_pool
                ->TensorAddress(layer - g.first_state_layer, seg.tensor, receiver.state_slot)
                .value() +
            seg.offset + static_cast<uint64_t>(u.first - seg.first_unit) * seg.unit_bytes;
      }
      run.at[kPacked] = packed;
      packed += run.bytes;
      out->state.push_back(run);
    }
  }
}

// The KV walk of a box with KV.
void PrepareKv(const PlanSide& writer, const PlanSide& receiver, const RankPlacement& c,
               const RankPlacement& g, TokenRange tokens, bool need_src, bool need_dst,
               bool unknown_writer_table, Prepared* out) {
  const Box& box = out->plan.box;
  out->kv = true;
  const PoolLayout& sp = *writer.pool;
  const PoolLayout& rp = *receiver.pool;
  const uint64_t row = rp.row_bytes();

  Walk& w = out->w;
  w.row_bytes = row;
  const int src_l0 = box.first_layer - c.first_layer;
  const int dst_l0 = box.first_layer - g.first_layer;
  std::vector<uint64_t>& src_layers = out->src_layers;
  std::vector<uint64_t>& dst_layers = out->dst_layers;
  if (sp.per_layer_bases()) src_layers = LayerTable(sp, src_l0, box.num_layers);
  if (rp.per_layer_bases()) dst_layers = LayerTable(rp, dst_l0, box.num_layers);
  w.origin[kSrc] =
      (sp.per_layer_bases() ? 0 : sp.layer_base(0).value() + src_l0 * sp.layer_stride()) +
      static_cast<uint64_t>(box.first_head - c.first_head) * sp.head_stride();
  w.origin[kDst] =
      (rp.per_layer_bases() ? 0 : rp.layer_base(0).value() + dst_l0 * rp.layer_stride()) +
      static_cast<uint64_t>(box.first_head - g.first_head) * rp.head_stride();
  w.origin[kPacked] = 0;

  auto axis = [&](PoolDim d, int64_t extent, uint64_t s_src, uint64_t s_dst) {
    Axis a;
    a.extent = extent;
    a.stride = {s_src, s_dst, 0};
    w.dim_axis[static_cast<size_t>(d)] = a;
  };
  axis(PoolDim::kLayer, box.num_layers, sp.layer_stride(), rp.layer_stride());
  if (!src_layers.empty())
    w.dim_axis[static_cast<size_t>(PoolDim::kLayer)].table[kSrc] = src_layers.data();
  if (!dst_layers.empty())
    w.dim_axis[static_cast<size_t>(PoolDim::kLayer)].table[kDst] = dst_layers.data();
  axis(PoolDim::kKv, box.kv_factor, sp.kv_stride(), rp.kv_stride());
  axis(PoolDim::kHead, box.num_heads, sp.head_stride(), rp.head_stride());
  axis(PoolDim::kToken, 0, sp.token_stride(), rp.token_stride());

  // Split the receiver's order at its block dimension.
  const auto& order = rp.order();
  size_t block_pos = 0;
  while (order[block_pos] != PoolDim::kBlock) ++block_pos;
  w.block_row_bytes = row;
  uint64_t token_packed_stride = row;
  for (size_t i = block_pos + 1; i < order.size(); ++i) {
    w.inner_dims.push_back(order[i]);
    if (order[i] != PoolDim::kToken) {
      w.block_row_bytes *= static_cast<uint64_t>(w.dim_axis[static_cast<size_t>(order[i])].extent);
    }
  }
  for (size_t i = order.size() - 1; order[i] != PoolDim::kToken; --i) {
    token_packed_stride *= static_cast<uint64_t>(w.dim_axis[static_cast<size_t>(order[i])].extent);
  }
  uint64_t outer_packed = w.block_row_bytes * static_cast<uint64_t>(tokens.size());
  for (size_t i = block_pos; i-- > 0;) {
    Axis a = w.dim_axis[static_cast<size_t>(order[i])];
    a.stride[kPacked] = outer_packed;
    outer_packed *= static_cast<uint64_t>(a.extent);
    if (a.extent == 1) {
      for (int k = 0; k < 3; ++k) w.origin[static_cast<size_t>(k)] += a.Offset(k, 0);
    } else {
      w.outer.insert(w.outer.begin(), a);
    }
  }

  // Segments: the token range cut at every sender and receiver block edge.
  const int64_t ts = sp.geometry().tokens_per_block;
  const int64_t tr = rp.geometry().tokens_per_block;
  const int64_t unknown_last_block = (tokens.end - 1) / ts;
  w.segments.reserve(static_cast<size_t>(tokens.size() / std::min(ts, tr) + 2));
  for (int64_t t = tokens.start; t < tokens.end;) {
    const int64_t rb = t / tr;
    const int64_t block_start = std::max(tokens.start, rb * tr);
    const int64_t block_end = std::min(tokens.end, (rb + 1) * tr);
    const int64_t seg_end = std::min(block_end, (t / ts + 1) * ts);
    Segment s;
    s.tokens = seg_end - t;
    s.block_tokens = block_end - block_start;
    if (need_src) {
      const uint64_t block =
          unknown_writer_table
              ? static_cast<uint64_t>(unknown_last_block - t / ts)
              : static_cast<uint64_t>(writer.block_table[static_cast<size_t>(t / ts)]);
      s.offset[kSrc] =
          block * sp.block_stride() + static_cast<uint64_t>(t % ts) * sp.token_stride();
    }
    if (need_dst) {
      s.offset[kDst] =
          static_cast<uint64_t>(receiver.block_table[static_cast<size_t>(rb)]) * rp.block_stride() +
          static_cast<uint64_t>(t % tr) * rp.token_stride();
    }
    s.offset[kPacked] = static_cast<uint64_t>(block_start - tokens.start) * w.block_row_bytes +
                        static_cast<uint64_t>(t - block_start) * token_packed_stride;
    w.segments.push_back(s);
    t = seg_end;
  }
}

}  // namespace

namespace {

// A plan's list (X, Y): the KV walk, then the state runs.
template <int X, int Y>
void EmitList(const Prepared& p, FragmentList* out) {
  if (p.kv) EmitKvList<X, Y>(p.w, out);
  FragmentSink sink(out);
  for (const StateRun& r : p.state) sink.Add(r.at[X], r.at[Y], r.bytes);
}

template <int X, int Y>
void EmitTiled(const Prepared& p, TiledList* out) {
  if (p.kv) EmitKvTiled<X, Y>(p.w, out);
  FragmentList tail;
  FragmentSink sink(&tail);
  for (const StateRun& r : p.state) sink.Add(r.at[X], r.at[Y], r.bytes);
  out->tail.assign(tail.begin(), tail.end());
}

template <int X, int Y>
uint64_t CountList(const Prepared& p, uint64_t limit) {
  CountingSink sink(limit);
  if (p.kv) WalkList<X, Y>(p.w, sink);
  for (const StateRun& r : p.state) {
    if (sink.full()) break;
    sink.Add(r.at[X], r.at[Y], r.bytes);
  }
  return sink.runs();
}

}  // namespace

Result<PairPlan> PlanPair(const PlanSide& writer, const PlanSide& receiver, TokenRange tokens,
                          uint8_t lists) {
  const bool need_src = (lists & (kPlanGather | kPlanDirect)) != 0;
  const bool need_dst = (lists & (kPlanScatter | kPlanDirect)) != 0;
  auto p = std::make_unique<Prepared>();
  KVB_RETURN_IF_ERROR(Prepare(writer, receiver, tokens, need_src, need_dst, false, p.get()));
  PairPlan& plan = p->plan;
  if (plan.box.empty()) return std::move(plan);
  if (lists & kPlanTiled) {
    if (lists & kPlanGather) EmitTiled<kSrc, kPacked>(*p, &plan.tiled_gather);
    if (lists & kPlanScatter) EmitTiled<kPacked, kDst>(*p, &plan.tiled_scatter);
    if (lists & kPlanDirect) EmitTiled<kSrc, kDst>(*p, &plan.tiled_direct);
    return std::move(plan);
  }
  if (lists & kPlanGather) EmitList<kSrc, kPacked>(*p, &plan.gather);
  if (lists & kPlanScatter) EmitList<kPacked, kDst>(*p, &plan.scatter);
  if (lists & kPlanDirect) EmitList<kSrc, kDst>(*p, &plan.direct);
  return std::move(plan);
}

Result<PlanRuns> CountPlanRuns(const PlanSide& writer, const PlanSide& receiver, TokenRange tokens,
                               uint8_t lists, uint64_t limit) {
  const bool need_src = (lists & (kPlanGather | kPlanDirect)) != 0;
  const bool need_dst = (lists & (kPlanScatter | kPlanDirect)) != 0;
  auto p = std::make_unique<Prepared>();
  KVB_RETURN_IF_ERROR(
      Prepare(writer, receiver, tokens, need_src, need_dst, writer.block_table.empty(), p.get()));
  PlanRuns runs;
  runs.packed_bytes = p->plan.packed_bytes;
  runs.state_bytes = p->plan.state_bytes;
  runs.fingerprint = p->plan.fingerprint;
  if (p->plan.box.empty()) return runs;
  if (lists & kPlanGather) runs.gather = CountList<kSrc, kPacked>(*p, limit);
  if (lists & kPlanScatter) runs.scatter = CountList<kPacked, kDst>(*p, limit);
  if (lists & kPlanDirect) runs.direct = CountList<kSrc, kDst>(*p, limit);
  return runs;
}

Result<PlanRuns> PlanTotals(const PlanSide& writer, const PlanSide& receiver, TokenRange tokens) {
  auto p = std::make_unique<Prepared>();
  KVB_RETURN_IF_ERROR(Prepare(writer, receiver, tokens, /*need_src=*/false, /*need_dst=*/true,
                              writer.block_table.empty(), p.get()));
  PlanRuns runs;
  runs.packed_bytes = p->plan.packed_bytes;
  runs.state_bytes = p->plan.state_bytes;
  runs.fingerprint = p->plan.fingerprint;
  return runs;
}

}  // namespace kvbounce
