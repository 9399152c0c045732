#include "tools/cluster.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <string>
#include <thread>
#include <utility>

namespace kvbounce::tools {
namespace {

constexpr std::byte kSentinel{0xC3};

uint64_t Mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t RowSeed(int layer, int kv, int head, int64_t token) {
  return Mix((static_cast<uint64_t>(layer) << 48) ^ (static_cast<uint64_t>(kv) << 44) ^
             (static_cast<uint64_t>(head) << 32) ^ static_cast<uint64_t>(token));
}

// Element d of a row from the row's seed (cheap, and distinct per element).
inline uint64_t FromSeed(uint64_t seed, int d) {
  return seed + static_cast<uint64_t>(d) * 0xd1342543de82ef95ULL;
}

std::vector<int32_t> Draw(int slot, int64_t blocks, std::mt19937_64& rng) {
  std::vector<int32_t> ids(static_cast<size_t>(2 * blocks));
  std::iota(ids.begin(), ids.end(), static_cast<int32_t>(slot * 2 * blocks));
  for (size_t i = ids.size(); i > 1; --i) std::swap(ids[i - 1], ids[rng() % i]);
  ids.resize(static_cast<size_t>(blocks));
  return ids;
}

}  // namespace

uint64_t ElementValue(int layer, int kv, int head, int64_t token, int d) {
  return FromSeed(RowSeed(layer, kv, head, token), d);
}

Cluster::Cluster(const ClusterOptions& options, Topology ctx, Topology gen)
    : options_(options), ctx_topology_(std::move(ctx)), gen_topology_(std::move(gen)) {}

Cluster::~Cluster() { Shutdown(); }

int64_t Cluster::blocks_per_request(bool ctx_side) const {
  const int64_t t = (ctx_side ? ctx_topology_ : gen_topology_).spec().tokens_per_block;
  return (options_.max_tokens + t - 1) / t;
}

Result<std::unique_ptr<Cluster>> Cluster::Create(const ClusterOptions& options) {
  if (options.slots < 1 || options.max_tokens < 1) {
    return InvalidArgumentError("cluster: slots and max_tokens must be >= 1");
  }
  KVB_ASSIGN_OR_RETURN(Topology ctx, Topology::Create(options.ctx, "--ctx"));
  KVB_ASSIGN_OR_RETURN(Topology gen, Topology::Create(options.gen, "--gen"));
  KVB_RETURN_IF_ERROR(CheckCompatible(ctx, gen));
  std::unique_ptr<Cluster> cluster(new Cluster(options, std::move(ctx), std::move(gen)));
  cluster->fabric_ = LoopbackFabric::Create();
  for (int r = 0; r < cluster->num_ctx(); ++r) KVB_RETURN_IF_ERROR(cluster->AddRank(true, r));
  for (int r = 0; r < cluster->num_gen(); ++r) KVB_RETURN_IF_ERROR(cluster->AddRank(false, r));
  std::vector<std::string> ctx_addresses;
  for (auto& r : cluster->ctx_) ctx_addresses.push_back(r.agent->Address());
  for (auto& r : cluster->gen_) KVB_RETURN_IF_ERROR(r.agent->Connect(ctx_addresses));

  std::mt19937_64 rng(0x6b76626f756e6365ULL);
  const int64_t blocks = cluster->blocks_per_request(true);
  for (int s = 0; s < options.slots; ++s) {
    cluster->ctx_tables_.push_back(Draw(s, blocks, rng));
    cluster->FillCtx(cluster->ctx_tables_.back());
  }
  for (int s = 0; s < options.slots; ++s) cluster->ClearGen(s);
  return cluster;
}

Status Cluster::AddRank(bool ctx_side, int rank) {
  const Topology& topology = ctx_side ? ctx_topology_ : gen_topology_;
  Rank r;
  const int64_t num_blocks = options_.slots * 2 * blocks_per_request(ctx_side);
  KVB_ASSIGN_OR_RETURN(PoolLayout layout, PoolLayout::ForRank(topology, rank, num_blocks, Addr()));
  const bool per_layer = options_.per_layer_pools && layout.kind() != LayoutKind::kBlockMajorHnd &&
                         layout.geometry().num_layers > 1;
  const size_t allocations = per_layer ? static_cast<size_t>(layout.geometry().num_layers) : 1;
  const uint64_t bytes = per_layer ? layout.layer_stride() : layout.allocation_bytes();
  for (size_t i = 0; i < allocations; ++i) {
    r.memory.emplace_back(static_cast<size_t>(bytes), kSentinel);
    r.bases.push_back(Addr::FromPointer(r.memory.back().data()));
  }
  Result<PoolLayout> placed =
      per_layer ? PoolLayout::CreatePerLayer(layout.kind(), layout.geometry(), r.bases)
                : layout.Rebased(r.bases);
  if (!placed.ok()) return placed.status();
  r.layout = std::make_unique<PoolLayout>(std::move(placed).value());

  const std::string& instance = ctx_side ? options_.ctx_instance : options_.gen_instance;
  const FaultOptions& faults = ctx_side ? options_.ctx_faults : options_.gen_faults;
  KVB_ASSIGN_OR_RETURN(r.agent, MakeAgent(ctx_side, rank, r, instance + "-" + std::to_string(rank),
                                          faults.seed, &r.faults));
  (ctx_side ? ctx_ : gen_).push_back(std::move(r));
  return Status::Ok();
}

Result<std::shared_ptr<Agent>> Cluster::MakeAgent(bool ctx_side, int rank, const Rank& r,
                                                  const std::string& name, uint64_t fault_seed,
                                                  FaultTransport** faults) {
  *faults = nullptr;
  const std::string& instance = ctx_side ? options_.ctx_instance : options_.gen_instance;
  KVB_ASSIGN_OR_RETURN(std::unique_ptr<LoopbackTransport> loopback,
                       LoopbackTransport::Create(fabric_, name));
  std::unique_ptr<Transport> transport = std::move(loopback);
  FaultTransport* decorator = nullptr;
  if (options_.faults) {
    FaultOptions fault_options = ctx_side ? options_.ctx_faults : options_.gen_faults;
    fault_options.seed = fault_seed;
    KVB_ASSIGN_OR_RETURN(std::unique_ptr<FaultTransport> faulty,
                         FaultTransport::Create(std::move(transport), fault_options));
    decorator = faulty.get();
    transport = std::move(faulty);
  }
  AgentOptions agent;
  agent.instance_id = instance;
  agent.role = ctx_side ? Role::kCtx : Role::kGen;
  agent.instance = (ctx_side ? ctx_topology_ : gen_topology_).spec();
  agent.rank = rank;
  agent.pool.bases = r.bases;
  agent.pool.num_blocks = options_.slots * 2 * blocks_per_request(ctx_side);
  agent.config = ctx_side ? options_.ctx_config : options_.gen_config;
  agent.transport = std::move(transport);
  agent.grace = options_.grace;
  Result<std::unique_ptr<Agent>> created =
      CreateAgent(std::move(agent), ctx_side ? options_.ctx_hooks : options_.gen_hooks);
  if (!created.ok()) {
    return created.status().WithContext(instance + " rank " + std::to_string(rank));
  }
  *faults = decorator;
  return std::shared_ptr<Agent>(std::move(created).value());
}

std::shared_ptr<Agent> Cluster::CtxAgent(int rank) const {
  std::lock_guard<std::mutex> lock(mu_);
  return ctx_[static_cast<size_t>(rank)].agent;
}

std::shared_ptr<Agent> Cluster::GenAgent(int rank) const {
  std::lock_guard<std::mutex> lock(mu_);
  return gen_[static_cast<size_t>(rank)].agent;
}

FaultStats Cluster::FaultTotals(bool ctx_side) const {
  std::lock_guard<std::mutex> lock(mu_);
  FaultStats total = retired_faults_[ctx_side ? 1 : 0];
  for (const Rank& r : ctx_side ? ctx_ : gen_) {
    if (r.faults == nullptr) continue;
    const FaultStats f = r.faults->fault_stats();
    total.injected_write_failures += f.injected_write_failures;
    total.failed_batches += f.failed_batches;
    total.dropped_connections += f.dropped_connections;
    total.delayed_completions += f.delayed_completions;
    total.delayed_messages += f.delayed_messages;
  }
  return total;
}

Status Cluster::RestartRank(bool ctx_side, int rank, RestartInfo* info) {
  std::lock_guard<std::mutex> restart_lock(restart_mu_);
  RestartInfo local;
  if (info == nullptr) info = &local;
  Rank& r = (ctx_side ? ctx_ : gen_)[static_cast<size_t>(rank)];
  std::shared_ptr<Agent> old;
  FaultTransport* old_faults = nullptr;
  int generation = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    old = r.agent;
    old_faults = r.faults;
    generation = ++r.generation;
  }
  info->old_address = old->Address();
  const auto start = std::chrono::steady_clock::now();
  old->Shutdown();
  info->shutdown_time = std::chrono::steady_clock::now() - start;
  info->outstanding_after_shutdown = old->Stats().arena_outstanding_bytes;

  const std::string& instance = ctx_side ? options_.ctx_instance : options_.gen_instance;
  const FaultOptions& fault_options = ctx_side ? options_.ctx_faults : options_.gen_faults;
  FaultTransport* faults = nullptr;
  KVB_ASSIGN_OR_RETURN(
      std::shared_ptr<Agent> fresh,
      MakeAgent(ctx_side, rank, r,
                instance + "-" + std::to_string(rank) + ".r" + std::to_string(generation),
                fault_options.seed + static_cast<uint64_t>(generation), &faults));
  info->new_address = fresh->Address();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (old_faults != nullptr) {
      const FaultStats f = old_faults->fault_stats();  // `old` keeps it alive
      FaultStats& total = retired_faults_[ctx_side ? 1 : 0];
      total.injected_write_failures += f.injected_write_failures;
      total.failed_batches += f.failed_batches;
      total.dropped_connections += f.dropped_connections;
      total.delayed_completions += f.delayed_completions;
      total.delayed_messages += f.delayed_messages;
    }
    r.agent = fresh;
    r.faults = faults;
  }
  old.reset();

  // Gen ranks connect to ctx ranks. The peers learn of the old agent's end
  // on their own threads; until they did, the new HELLO for the same rank is
  // refused as a duplicate (kAlreadyExists), so retry that briefly.
  auto connect = [](Agent& from, std::vector<std::string> addresses) -> Status {
    Status s;
    for (int attempt = 0; attempt < 50; ++attempt) {
      s = from.Connect(addresses);
      if (s.code() != StatusCode::kAlreadyExists) return s;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return s;
  };
  if (ctx_side) {
    for (int g = 0; g < num_gen(); ++g) {
      KVB_RETURN_IF_ERROR(
          connect(*GenAgent(g), {info->new_address}).WithContext("gen rank " + std::to_string(g)));
    }
  } else {
    std::vector<std::string> ctx_addresses;
    for (int c = 0; c < num_ctx(); ++c) ctx_addresses.push_back(CtxAgent(c)->Address());
    KVB_RETURN_IF_ERROR(
        connect(*fresh, ctx_addresses).WithContext("restarted gen rank " + std::to_string(rank)));
  }
  return Status::Ok();
}

Status Cluster::Reconnect(int gen_rank, int ctx_rank) {
  std::lock_guard<std::mutex> restart_lock(restart_mu_);
  const std::vector<std::string> address = {CtxAgent(ctx_rank)->Address()};
  const Status s = GenAgent(gen_rank)->Connect(address);
  // The writer refused a second connection: the first one is alive.
  if (std::string_view(s.message()).find("is already connected") != std::string_view::npos) {
    return Status::Ok();
  }
  return s;
}

BlockTables Cluster::Tables(int slot, int64_t tokens, std::mt19937_64& rng) const {
  BlockTables t;
  t.slot = slot;
  const int64_t ctx_blocks =
      (tokens + ctx_topology_.spec().tokens_per_block - 1) / ctx_topology_.spec().tokens_per_block;
  t.ctx.assign(ctx_tables_[static_cast<size_t>(slot)].begin(),
               ctx_tables_[static_cast<size_t>(slot)].begin() + ctx_blocks);
  std::vector<int32_t> gen = Draw(slot, blocks_per_request(false), rng);
  const int64_t gen_blocks =
      (tokens + gen_topology_.spec().tokens_per_block - 1) / gen_topology_.spec().tokens_per_block;
  gen.resize(static_cast<size_t>(gen_blocks));
  t.gen = std::move(gen);
  return t;
}

void Cluster::FillCtx(const std::vector<int32_t>& table) {
  for (int rank = 0; rank < num_ctx(); ++rank) FillCtxRank(rank, table);
}

void Cluster::FillCtxRank(int rank, const std::vector<int32_t>& table) {
  const int e = static_cast<int>(ctx_topology_.elem_bytes());
  const int dim = ctx_topology_.spec().model.head_dim;
  const int64_t tpb = ctx_topology_.spec().tokens_per_block;
  const RankPlacement p = ctx_topology_.Placement(rank);
  const PoolLayout& layout = *ctx_[static_cast<size_t>(rank)].layout;
  for (int l = 0; l < p.num_layers; ++l) {
    for (int kv = 0; kv < layout.geometry().kv_factor; ++kv) {
      for (int h = 0; h < p.num_heads; ++h) {
        for (int64_t t = 0; t < options_.max_tokens; ++t) {
          auto* row =
              static_cast<std::byte*>(layout
                                          .RowAddress(l, kv, table[static_cast<size_t>(t / tpb)], h,
                                                      static_cast<int>(t % tpb))
                                          .ToPointer());
          const uint64_t seed = RowSeed(p.first_layer + l, kv, p.first_head + h, t);
          for (int d = 0; d < dim; ++d) {
            const uint64_t v = FromSeed(seed, d);
            for (int b = 0; b < e; ++b) row[d * e + b] = static_cast<std::byte>(v >> (8 * b));
          }
        }
      }
    }
  }
}

std::vector<std::span<std::byte>> Cluster::SlotMemory(bool ctx_side, int rank, int slot) const {
  const Rank& r = (ctx_side ? ctx_ : gen_)[static_cast<size_t>(rank)];
  const PoolLayout& layout = *r.layout;
  const int64_t blocks = 2 * blocks_per_request(ctx_side);
  const int32_t first = static_cast<int32_t>(slot * blocks);
  const size_t bytes = static_cast<size_t>(blocks * static_cast<int64_t>(layout.block_stride()));
  std::vector<std::span<std::byte>> out;
  if (layout.kind() == LayoutKind::kBlockMajorHnd) {
    out.emplace_back(static_cast<std::byte*>(layout.RowAddress(0, 0, first, 0, 0).ToPointer()),
                     bytes);
    return out;
  }
  const PoolGeometry& g = layout.geometry();
  for (int l = 0; l < g.num_layers; ++l) {
    for (int kv = 0; kv < g.kv_factor; ++kv) {
      out.emplace_back(static_cast<std::byte*>(layout.RowAddress(l, kv, first, 0, 0).ToPointer()),
                       bytes);
    }
  }
  return out;
}

void Cluster::FillSlot(bool ctx_side, int rank, int slot, std::byte value) {
  for (std::span<std::byte> m : SlotMemory(ctx_side, rank, slot)) {
    std::memset(m.data(), static_cast<int>(value), m.size());
  }
}

void Cluster::RefillCtx(int rank, int slot) {
  FillSlot(true, rank, slot, kSentinel);
  FillCtxRank(rank, ctx_tables_[static_cast<size_t>(slot)]);
}

void Cluster::ClearGen(int slot) {
  for (int rank = 0; rank < num_gen(); ++rank) FillSlot(false, rank, slot, kSentinel);
}

VerifyResult Cluster::VerifyGen(int rank, const BlockTables& tables, TokenRange range) const {
  VerifyResult result;
  const Rank& r = gen_[static_cast<size_t>(rank)];
  const PoolLayout& layout = *r.layout;
  const PoolGeometry& g = layout.geometry();
  const RankPlacement p = gen_topology_.Placement(rank);
  const int e = static_cast<int>(gen_topology_.elem_bytes());
  const int dim = g.head_dim;
  const int64_t tpb = g.tokens_per_block;
  const int64_t blocks = 2 * blocks_per_request(false);
  const int32_t first = static_cast<int32_t>(tables.slot * blocks);
  std::vector<int64_t> logical(static_cast<size_t>(blocks), -1);  // block -> table index
  for (size_t i = 0; i < tables.gen.size(); ++i) {
    logical[static_cast<size_t>(tables.gen[i] - first)] = static_cast<int64_t>(i);
  }
  auto mismatch = [&](const std::string& what) {
    if (result.mismatches++ == 0) result.first_mismatch = what;
  };
  for (int64_t bi = 0; bi < blocks; ++bi) {
    const int32_t block = first + static_cast<int32_t>(bi);
    const int64_t index = logical[static_cast<size_t>(bi)];
    for (int l = 0; l < g.num_layers; ++l) {
      for (int kv = 0; kv < g.kv_factor; ++kv) {
        for (int h = 0; h < g.num_heads; ++h) {
          for (int tt = 0; tt < tpb; ++tt) {
            const auto* row =
                static_cast<const std::byte*>(layout.RowAddress(l, kv, block, h, tt).ToPointer());
            const int64_t token = index < 0 ? -1 : index * tpb + tt;
            if (token >= range.start && token < range.end) {
              const uint64_t seed = RowSeed(p.first_layer + l, kv, p.first_head + h, token);
              bool ok = true;
              for (int d = 0; d < dim && ok; ++d) {
                const uint64_t v = FromSeed(seed, d);
                for (int b = 0; b < e; ++b) {
                  if (row[d * e + b] != static_cast<std::byte>(v >> (8 * b))) ok = false;
                }
              }
              result.verified_bytes += static_cast<uint64_t>(dim * e);
              if (!ok) {
                mismatch("gen rank " + std::to_string(rank) + ": layer " +
                         std::to_string(p.first_layer + l) + " kv " + std::to_string(kv) +
                         " head " + std::to_string(p.first_head + h) + " token " +
                         std::to_string(token) + " holds wrong bytes");
              }
            } else {
              for (int i = 0; i < dim * e; ++i) {
                if (row[i] != kSentinel) {
                  mismatch("gen rank " + std::to_string(rank) + ": block " + std::to_string(block) +
                           " layer " + std::to_string(p.first_layer + l) + " token slot " +
                           std::to_string(tt) + " outside the request was written");
                  break;
                }
              }
            }
          }
        }
      }
    }
  }
  return result;
}

Status Cluster::RunRequest(uint64_t request_id, const BlockTables& tables, TokenRange range,
                           PullOptions pull, std::vector<TransferInfo>* infos) {
  std::vector<std::shared_ptr<Transfer>> published, pulled;
  for (auto& r : ctx_) {
    KVB_ASSIGN_OR_RETURN(auto t, r.agent->Publish(request_id, tables.ctx, range.end));
    published.push_back(std::move(t));
  }
  Status first;
  for (auto& r : gen_) {
    Result<std::shared_ptr<Transfer>> t =
        r.agent->Pull(request_id, options_.ctx_instance, tables.gen, range, pull);
    if (!t.ok()) {
      if (first.ok()) first = t.status();
      continue;
    }
    pulled.push_back(std::move(t).value());
  }
  for (auto& t : pulled) {
    Status s = t->Wait();
    if (first.ok() && !s.ok()) first = s;
    if (infos != nullptr) infos->push_back(t->info());
  }
  for (auto& t : published) {
    if (!t->WaitFor(std::chrono::milliseconds(0))) t->Cancel();
    t->Wait().IgnoreError();
  }
  return first;
}

std::vector<std::span<std::byte>> Cluster::PoolMemory(bool ctx_side, int rank) {
  std::vector<std::span<std::byte>> out;
  for (auto& allocation : (ctx_side ? ctx_ : gen_)[static_cast<size_t>(rank)].memory) {
    out.emplace_back(allocation.data(), allocation.size());
  }
  return out;
}

void Cluster::Shutdown() {
  for (int r = 0; r < num_gen() && r < static_cast<int>(gen_.size()); ++r) {
    if (std::shared_ptr<Agent> a = GenAgent(r)) a->Shutdown();
  }
  for (int r = 0; r < num_ctx() && r < static_cast<int>(ctx_.size()); ++r) {
    if (std::shared_ptr<Agent> a = CtxAgent(r)) a->Shutdown();
  }
}

}  // namespace kvbounce::tools
