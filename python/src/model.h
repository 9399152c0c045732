// kvbounce.Model, kvbounce.Instance, kvbounce.plan and the pool geometry the
// Python layer checks tensors against.
//
// Thread safety: Model and Instance are immutable values once built.
#ifndef KVBOUNCE_PYTHON_MODEL_H_
#define KVBOUNCE_PYTHON_MODEL_H_

#include <pybind11/pybind11.h>

#include "kvbounce/model.h"
#include "layout/topology.h"

namespace kvbounce::python {

// One ctx or gen instance, validated: Topology::Create accepted its spec.
class Instance {
 public:
  explicit Instance(Topology topology) : topology_(std::move(topology)) {}
  const InstanceSpec& spec() const { return topology_.spec(); }
  const Topology& topology() const { return topology_; }

 private:
  Topology topology_;
};

void RegisterModel(pybind11::module_& m);

}  // namespace kvbounce::python

#endif  // KVBOUNCE_PYTHON_MODEL_H_
