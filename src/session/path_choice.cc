#include "session/path_choice.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

namespace kvbounce {
namespace {

constexpr double kUnavailable = std::numeric_limits<double>::infinity();

// Overrides first, then the stated figure, then the fallback.
double Figure(int64_t override_value, double scale, double stated, double unknown) {
  if (override_value > 0) return static_cast<double>(override_value) * scale;
  if (stated > 0 && std::isfinite(stated)) return stated;
  return unknown;
}

// One writer's share of per-block's estimate with `runs` direct runs.
double PerBlockWriterUs(const WriterLoad& w, const TransportCost& link, double runs) {
  return 2 * kHandOffUs + link.write_us + (runs + 1) * link.op_us +
         static_cast<double>(w.bytes) / link.bytes_per_us;
}

// The hand-off of one of the writer's copies: none where the engine copies
// a batch of at most copy.inline_bytes on the control loop that submits it
// (the gather, the scatter and a writer's direct copy move the same bytes).
double CopyHandOffUs(const WriterLoad& w, const CopyCost& copy) {
  return copy.inline_bytes > 0 && w.bytes <= copy.inline_bytes ? 0 : kHandOffUs;
}

// One writer's share of direct's estimate where the writer copies into this
// rank's pool (WriterLoad::direct), with `runs` direct runs.
double DirectCopyWriterUs(const WriterLoad& w, const CopyCost& copy, double runs) {
  return CopyHandOffUs(w, copy) + copy.batch_us + runs * copy.run_us +
         static_cast<double>(w.bytes) / copy.bytes_per_us;
}

}  // namespace

TransportCost EffectiveLinkCost(const Config& config, TransportCost stated) {
  TransportCost cost;
  cost.op_us = Figure(config.transport_op_ns, 1e-3, stated.op_us, kUnknownOpUs);
  // 1 MB/s is one byte per µs.
  cost.bytes_per_us =
      Figure(config.transport_mb_per_s, 1, stated.bytes_per_us, kUnknownLinkBytesPerUs);
  cost.write_us = stated.write_us > 0 && std::isfinite(stated.write_us) ? stated.write_us : 0;
  return cost;
}

CopyCost EffectiveCopyCost(const Config& config, CopyCost stated) {
  CopyCost cost;
  cost.batch_us = stated.batch_us > 0 && std::isfinite(stated.batch_us) ? stated.batch_us : 0;
  cost.run_us = Figure(config.copy_run_ns, 1e-3, stated.run_us, kUnknownRunUs);
  cost.bytes_per_us = Figure(config.copy_mb_per_s, 1, stated.bytes_per_us, kUnknownCopyBytesPerUs);
  cost.inline_bytes = stated.inline_bytes;
  return cost;
}

TransportCost EffectiveReadCost(const Config& config, TransportCost stated,
                                const CopyCost& copy) {
  const CopyCost effective = EffectiveCopyCost(config, copy);
  TransportCost cost;
  cost.op_us = stated.op_us > 0 && std::isfinite(stated.op_us) ? stated.op_us : effective.run_us;
  cost.bytes_per_us = stated.bytes_per_us > 0 && std::isfinite(stated.bytes_per_us)
                          ? stated.bytes_per_us
                          : effective.bytes_per_us;
  return cost;
}

bool DirectAvailable(std::span<const WriterLoad> writers) {
  return !writers.empty() && std::all_of(writers.begin(), writers.end(), [](const WriterLoad& w) {
    return w.direct || w.direct_read;
  });
}

bool PerBlockAvailable(std::span<const WriterLoad> writers) {
  return std::all_of(writers.begin(), writers.end(),
                     [](const WriterLoad& w) { return w.per_block; });
}

bool BounceAvailable(std::span<const WriterLoad> writers, bool recv_arena) {
  return recv_arena && !writers.empty() &&
         std::all_of(writers.begin(), writers.end(),
                     [](const WriterLoad& w) { return w.send_arena; });
}

PathEstimate EstimatePaths(const Config& config, std::span<const WriterLoad> writers,
                           const CopyCost& stated_copy, bool recv_arena) {
  const CopyCost copy = EffectiveCopyCost(config, stated_copy);
  PathEstimate e;
  for (const WriterLoad& w : writers) {
    const TransportCost link = EffectiveLinkCost(config, w.link);
    const double bytes = static_cast<double>(w.bytes);
    const double on_link = bytes / link.bytes_per_us;
    const double copied = bytes / copy.bytes_per_us;
    const double copy_hand_off = CopyHandOffUs(w, copy);
    const auto direct_runs = static_cast<double>(w.direct_runs);
    e.per_block_us += PerBlockWriterUs(w, link, direct_runs);
    // Where the writer maps this rank's memory it gathers straight into
    // the recv slot (Config::bounce_gather_mapped): no link operation.
    const bool mapped_bounce = w.direct && config.bounce_gather_mapped != 0;
    e.bounce_us += 2 * kHandOffUs + 2 * copy_hand_off +
                   (mapped_bounce ? 0 : link.write_us + 2 * link.op_us + on_link) +
                   2 * copy.batch_us +
                   static_cast<double>(w.gather_runs + w.scatter_runs) * copy.run_us + 2 * copied;
    if (w.direct) {
      e.direct_us += DirectCopyWriterUs(w, copy, direct_runs);
    } else if (w.mapped_read) {
      e.direct_us += 2 * kHandOffUs + DirectCopyWriterUs(w, copy, direct_runs);
    } else {
      const TransportCost read = EffectiveReadCost(config, w.read, stated_copy);
      e.direct_us +=
          3 * kHandOffUs + direct_runs * (read.op_us + kReadPlanRunUs) + bytes / read.bytes_per_us;
    }
  }
  if (!PerBlockAvailable(writers)) e.per_block_us = kUnavailable;
  if (!DirectAvailable(writers)) e.direct_us = kUnavailable;
  if (!BounceAvailable(writers, recv_arena)) e.bounce_us = kUnavailable;
  return e;
}

uint64_t PerBlockLosesFrom(const Config& config, const WriterLoad& writer,
                           const CopyCost& stated_copy) {
  constexpr uint64_t kAny = std::numeric_limits<uint64_t>::max();
  if (!writer.direct) return kAny;
  const CopyCost copy = EffectiveCopyCost(config, stated_copy);
  const TransportCost link = EffectiveLinkCost(config, writer.link);
  auto margin = [&](double runs) {
    return PerBlockWriterUs(writer, link, runs) - DirectCopyWriterUs(writer, copy, runs);
  };
  // Each run adds op_us to per-block and run_us to direct.
  const double slope = link.op_us - copy.run_us;
  const double at_zero = margin(0);
  if (!std::isfinite(at_zero) || !(slope >= 0)) return kAny;
  if (at_zero > 0) return 0;
  if (slope == 0) return kAny;
  const double runs = std::floor(-at_zero / slope) + 1;
  if (!(runs < 1e15)) return kAny;  // beyond any plan; and exact in a double
  auto from = static_cast<uint64_t>(runs);
  for (int i = 0; i < 4 && !(margin(static_cast<double>(from)) > 0); ++i) ++from;  // rounding
  return from;
}

Result<PathChoice> ChoosePath(const Config& config, TransferPath requested,
                              std::span<const WriterLoad> writers, const CopyCost& copy,
                              bool recv_arena, std::string_view transport_name) {
  PathChoice choice;
  switch (requested) {
    case TransferPath::kPerBlock:
      if (!PerBlockAvailable(writers)) {
        return UnimplementedError(
            "Pull: the per-block path needs the transport to reach both pools; the " +
            std::string(transport_name) +
            " transport cannot reach device memory here (bounce stages through host memory)");
      }
      choice.path = TransferPath::kPerBlock;
      return choice;
    case TransferPath::kBounce:
      if (!recv_arena) {
        return InvalidArgumentError("Pull: the bounce path needs bounce_size_mb > 0");
      }
      choice.path = TransferPath::kBounce;
      return choice;
    case TransferPath::kDirect:
      for (const WriterLoad& w : writers) {
        if (!w.direct && !w.direct_read) {
          return UnimplementedError(
              "Pull: the direct path needs writers that can map this rank's pool, or whose "
              "pool this rank can read; the " +
              std::string(transport_name) + " transport cannot here");
        }
      }
      choice.path = TransferPath::kDirect;
      return choice;
    case TransferPath::kAuto:
      break;
  }
  choice.estimate = EstimatePaths(config, writers, copy, recv_arena);
  const PathEstimate& e = choice.estimate;
  // Ties: direct (no transport), then per-block (no arena), then bounce.
  choice.path = TransferPath::kPerBlock;
  double best = e.per_block_us;
  if (e.direct_us <= best) {
    choice.path = TransferPath::kDirect;
    best = e.direct_us;
  }
  if (e.bounce_us < best) {
    choice.path = TransferPath::kBounce;
    best = e.bounce_us;
  }
  if (std::isinf(best)) {
    return FailedPreconditionError(
        "Pull: no path is available: the " + std::string(transport_name) +
        " transport cannot reach a device pool, and the bounce path, which stages through host "
        "memory, is off (bounce_size_mb = 0)");
  }
  return choice;
}

std::string DescribeEstimate(const PathEstimate& estimate) {
  auto one = [](const char* name, double us) {
    char text[64];
    if (std::isinf(us)) {
      std::snprintf(text, sizeof(text), "%s n/a", name);
    } else {
      std::snprintf(text, sizeof(text), "%s %.1f us", name, us);
    }
    return std::string(text);
  };
  return one("per-block", estimate.per_block_us) + ", " + one("bounce", estimate.bounce_us) + ", " +
         one("direct", estimate.direct_us);
}

}  // namespace kvbounce
