# Build options. CUDA, UCX and Python are optional: AUTO builds their targets when the
# dependency is found and leaves the CPU build complete when it is not.
set(KVBOUNCE_WITH_CUDA AUTO CACHE STRING "Build kvbounce::cuda (ON, OFF, AUTO)")
set_property(CACHE KVBOUNCE_WITH_CUDA PROPERTY STRINGS ON OFF AUTO)
set(KVBOUNCE_WITH_UCX AUTO CACHE STRING "Build kvbounce::ucx (ON, OFF, AUTO)")
set_property(CACHE KVBOUNCE_WITH_UCX PROPERTY STRINGS ON OFF AUTO)
set(KVBOUNCE_WITH_PYTHON AUTO CACHE STRING
    "Build the kvbounce Python module (ON, OFF, AUTO: when python3-dev and pybind11 are found)")
set_property(CACHE KVBOUNCE_WITH_PYTHON PROPERTY STRINGS ON OFF AUTO)
option(KVBOUNCE_BUILD_TESTS "Build the GoogleTest suites" ON)
option(KVBOUNCE_BUILD_BENCH "Build the Google Benchmark programs" ON)
option(KVBOUNCE_BUILD_FUZZ "Build libFuzzer targets (needs clang)" OFF)
set(KVBOUNCE_SANITIZE "" CACHE STRING "Sanitizers: '', 'address,undefined' or 'thread'")

set(KVBOUNCE_WARNINGS -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor
    -Wno-missing-field-initializers)

if(KVBOUNCE_SANITIZE)
  add_compile_options(-fsanitize=${KVBOUNCE_SANITIZE} -fno-omit-frame-pointer
                      -fno-sanitize-recover=all)
  add_link_options(-fsanitize=${KVBOUNCE_SANITIZE})
endif()
