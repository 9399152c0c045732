#include "tools/cluster.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <thread>
#include <utility>

#include "tools/resource_limits.h"

namespace kvbounce::tools {

Cluster::Cluster(const ClusterOptions& options, Topology ctx, Topology gen)
    : options_(options), ctx_topology_(std::move(ctx)), gen_topology_(std::move(gen)) {}

Cluster::~Cluster() { Shutdown(); }

int64_t Cluster::blocks_per_request(bool ctx_side) const {
  const int64_t t = (ctx_side ? ctx_topology_ : gen_topology_).spec().tokens_per_block;
  return CeilDiv(options_.max_tokens, t);
}

Result<std::unique_ptr<Cluster>> Cluster::Create(const ClusterOptions& options) {
  if (options.slots < 1 || options.max_tokens < 1) {
    return InvalidArgumentError("cluster: slots and max_tokens must be >= 1");
  }
  if (options.ctx_instances < 1 || options.ctx_instances > kMaxCtxInstances) {
    return InvalidArgumentError(
        "cluster: ctx_instances = " + std::to_string(options.ctx_instances) + " must be in [1, " +
        std::to_string(kMaxCtxInstances) + "]");
  }
  std::vector<std::string> names = {options.ctx_instance};
  for (int i = 1; i < options.ctx_instances; ++i) {
    names.push_back("ctx" + std::to_string(i));
    if (names.back() == options.ctx_instance || names.back() == options.gen_instance) {
      return InvalidArgumentError("cluster: ctx instance " + std::to_string(i) + "'s name " +
                                  names.back() + " is taken (ctx_instance / gen_instance)");
    }
  }
  KVB_ASSIGN_OR_RETURN(Topology ctx, Topology::Create(options.ctx, "--ctx"));
  KVB_ASSIGN_OR_RETURN(Topology gen, Topology::Create(options.gen, "--gen"));
  KVB_RETURN_IF_ERROR(CheckCompatible(ctx, gen));
  std::unique_ptr<Cluster> cluster(new Cluster(options, std::move(ctx), std::move(gen)));
  cluster->ctx_names_ = std::move(names);
  cluster->fabric_ = LoopbackFabric::Create();
  for (int i = 0; i < options.ctx_instances; ++i) {
    for (int r = 0; r < cluster->num_ctx(); ++r) {
      KVB_RETURN_IF_ERROR(cluster->AddRank(true, i, r));
    }
  }
  for (int r = 0; r < cluster->num_gen(); ++r) KVB_RETURN_IF_ERROR(cluster->AddRank(false, 0, r));
  // One Connect per gen rank to the ranks of every instance: a gen agent
  // tells the instances apart by their HELLOs.
  const std::vector<std::string> ctx_addresses = cluster->CtxAddresses();
  for (auto& r : cluster->gen_) KVB_RETURN_IF_ERROR(r.agent->Connect(ctx_addresses));
  return cluster;
}

std::vector<std::string> Cluster::CtxAddresses() const {
  std::vector<std::string> addresses;
  for (int i = 0; i < num_ctx_instances(); ++i) {
    for (int r = 0; r < num_ctx(); ++r) addresses.push_back(CtxAgent(i, r)->Address());
  }
  return addresses;
}

Status Cluster::AddRank(bool ctx_side, int instance, int rank) {
  RankHarnessOptions harness;
  harness.role = ctx_side ? Role::kCtx : Role::kGen;
  harness.rank = rank;
  harness.ctx_instance = ctx_side ? instance : 0;
  harness.slots = options_.slots;
  harness.max_tokens = options_.max_tokens;
  harness.per_layer_pools = options_.per_layer_pools;
  harness.table_seed = options_.table_seed;
  harness.memory = options_.memory;
  harness.device = options_.device;
  Rank r;
  KVB_ASSIGN_OR_RETURN(r.harness,
                       RankHarness::Create(ctx_side ? ctx_topology_ : gen_topology_, harness));
  const std::string& name =
      ctx_side ? ctx_names_[static_cast<size_t>(instance)] : options_.gen_instance;
  const FaultOptions& faults = ctx_side ? options_.ctx_faults : options_.gen_faults;
  // Each ctx instance's injector draws from a seed of its own (instance 0
  // from the configured one).
  KVB_ASSIGN_OR_RETURN(
      r.agent, MakeAgent(ctx_side, name, rank, r, name + "-" + std::to_string(rank),
                         faults.seed + static_cast<uint64_t>(instance) * 1000003, &r.faults));
  (ctx_side ? ctx_ : gen_).push_back(std::move(r));
  return Status::Ok();
}

Result<std::shared_ptr<Agent>> Cluster::MakeAgent(bool ctx_side, const std::string& instance,
                                                  int rank, const Rank& r, const std::string& name,
                                                  uint64_t fault_seed, FaultTransport** faults) {
  *faults = nullptr;
  KVB_ASSIGN_OR_RETURN(std::unique_ptr<LoopbackTransport> loopback,
                       LoopbackTransport::Create(fabric_, name, options_.loopback));
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
  AgentOptions agent = r.harness->MakeAgentOptions(
      instance, ctx_side ? options_.ctx_config : options_.gen_config, options_.grace);
  agent.transport = std::move(transport);
  Result<std::unique_ptr<Agent>> created =
      CreateAgent(std::move(agent), ctx_side ? options_.ctx_hooks : options_.gen_hooks);
  if (!created.ok()) {
    return created.status().WithContext(instance + " rank " + std::to_string(rank));
  }
  *faults = decorator;
  return std::shared_ptr<Agent>(std::move(created).value());
}

std::shared_ptr<Agent> Cluster::CtxAgent(int instance, int rank) const {
  std::lock_guard<std::mutex> lock(mu_);
  return CtxRank(instance, rank).agent;
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

  const std::string& instance = ctx_side ? ctx_names_.front() : options_.gen_instance;
  const FaultOptions& fault_options = ctx_side ? options_.ctx_faults : options_.gen_faults;
  FaultTransport* faults = nullptr;
  KVB_ASSIGN_OR_RETURN(
      std::shared_ptr<Agent> fresh,
      MakeAgent(ctx_side, instance, rank, r,
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
    KVB_RETURN_IF_ERROR(
        connect(*fresh, CtxAddresses()).WithContext("restarted gen rank " + std::to_string(rank)));
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

BlockTables Cluster::Tables(int ctx_instance, int slot, int64_t tokens,
                            std::mt19937_64& rng) const {
  BlockTables t;
  t.ctx_instance = ctx_instance;
  t.slot = slot;
  t.ctx = TablePrefix(CtxRank(ctx_instance, 0).harness->CtxTable(slot), tokens,
                      ctx_topology_.spec().tokens_per_block);
  t.gen = TablePrefix(SlotTable(slot, blocks_per_request(false), rng()), tokens,
                      gen_topology_.spec().tokens_per_block);
  return t;
}

BlockTables Cluster::Tables(int ctx_instance, int slot, int64_t tokens, uint64_t seed,
                            uint64_t request_id) const {
  BlockTables t;
  t.ctx_instance = ctx_instance;
  t.slot = slot;
  t.ctx = TablePrefix(CtxRank(ctx_instance, 0).harness->CtxTable(slot), tokens,
                      ctx_topology_.spec().tokens_per_block);
  t.gen = gen_.front().harness->GenTable(slot, tokens, seed, request_id);
  return t;
}

std::vector<std::span<std::byte>> Cluster::SlotMemory(bool ctx_side, int rank, int slot) const {
  return (ctx_side ? ctx_ : gen_)[static_cast<size_t>(rank)].harness->SlotMemory(slot);
}

Result<std::vector<std::vector<std::byte>>> Cluster::SlotBytes(bool ctx_side, int rank,
                                                               int slot) const {
  return (ctx_side ? ctx_ : gen_)[static_cast<size_t>(rank)].harness->SlotBytes(slot);
}

void Cluster::FillSlot(bool ctx_side, int rank, int slot, std::byte value) {
  harness(ctx_side, rank).FillSlot(slot, value);
}

void Cluster::RefillCtx(int rank, int slot) { harness(true, rank).RefillCtx(slot); }

void Cluster::ClearGen(int slot) {
  for (int rank = 0; rank < num_gen(); ++rank) harness(false, rank).ClearSlot(slot);
}

VerifyResult Cluster::VerifyGen(int rank, const BlockTables& tables, TokenRange range) const {
  VerifyResult v = gen_[static_cast<size_t>(rank)].harness->VerifyGen(tables.slot, tables.gen,
                                                                      range, tables.ctx_instance);
  if (v.mismatches != 0 && num_ctx_instances() > 1) {
    v.first_mismatch += " (verified against " + ctx_instance_name(tables.ctx_instance) + "'s KV)";
  }
  return v;
}

Status Cluster::RunRequest(uint64_t request_id, const BlockTables& tables, TokenRange range,
                           PullOptions pull, std::vector<TransferInfo>* infos) {
  std::vector<std::shared_ptr<Transfer>> published, pulled;
  for (int c = 0; c < num_ctx(); ++c) {
    // Hybrid models: the state moves with the KV (the harness's state slot
    // of the request's slot, where the rank has a state pool).
    Rank& rank = CtxRank(tables.ctx_instance, c);
    PublishOptions publish;
    publish.state_slot = rank.harness->StateSlot(tables.slot);
    KVB_ASSIGN_OR_RETURN(auto t, rank.agent->Publish(request_id, tables.ctx, range.end, publish));
    published.push_back(std::move(t));
  }
  Status first;
  const std::string& instance = ctx_instance_name(tables.ctx_instance);
  for (auto& r : gen_) {
    pull.state_slot = r.harness->StateSlot(tables.slot);
    Result<std::shared_ptr<Transfer>> t =
        r.agent->Pull(request_id, instance, tables.gen, range, pull);
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
  return harness(ctx_side, rank).PoolMemory();
}

void Cluster::Shutdown() {
  for (int r = 0; r < num_gen() && r < static_cast<int>(gen_.size()); ++r) {
    if (std::shared_ptr<Agent> a = GenAgent(r)) a->Shutdown();
  }
  // A Create that failed half way leaves fewer ctx ranks than instances
  // times ranks.
  for (size_t i = 0; i < ctx_.size(); ++i) {
    std::shared_ptr<Agent> a;
    {
      std::lock_guard<std::mutex> lock(mu_);
      a = ctx_[i].agent;
    }
    if (a) a->Shutdown();
  }
}

}  // namespace kvbounce::tools
