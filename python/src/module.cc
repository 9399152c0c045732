// The kvbounce._kvbounce extension module: the C++ library's Python face.
// The kvbounce package (python/kvbounce) re-exports it and adds what is
// easier said in Python (pools from tensors and arrays, asyncio).
#include <pybind11/pybind11.h>

#include "python/src/agent.h"
#include "python/src/errors.h"
#include "python/src/model.h"

PYBIND11_MODULE(_kvbounce, m) {
  m.doc() = "kvbounce: moves paged KV cache between prefill and decode workers";
  kvbounce::python::RegisterErrors(m);
  kvbounce::python::RegisterModel(m);
  kvbounce::python::RegisterAgent(m);
}
