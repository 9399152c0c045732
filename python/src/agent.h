// kvbounce._Agent, kvbounce.Transfer and kvbounce.LoopbackFabric: the
// Agent API over pybind11 (the Python package's Agent subclasses _Agent to
// turn tensors and arrays into pool addresses).
//
// The GIL and kvbounce's threads:
//   * every call into the library that can wait (Create, Connect, Publish,
//     Pull, Stats, Shutdown, Transfer waits) releases the GIL, so a
//     completion callback that needs it can always run meanwhile;
//   * a done callback runs on the agent's control thread (or on the thread
//     that settles it: Shutdown's, or add_done_callback's when already
//     settled) holding the GIL only while the Python function runs; a Python
//     object kvbounce holds is released with the GIL taken;
//   * no Python runs on kvbounce's threads once the interpreter finalizes
//     (the package closes every agent at exit, before that);
//   * an agent whose last reference goes away on a kvbounce thread (inside a
//     callback) is shut down later on the main thread (Py_AddPendingCall),
//     never on the thread it would have to join.
//
// Thread safety: every method may be called from any Python thread.
#ifndef KVBOUNCE_PYTHON_AGENT_H_
#define KVBOUNCE_PYTHON_AGENT_H_

#include <pybind11/pybind11.h>

namespace kvbounce::python {

void RegisterAgent(pybind11::module_& m);

}  // namespace kvbounce::python

#endif  // KVBOUNCE_PYTHON_AGENT_H_
