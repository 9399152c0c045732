// The precompiled header every test executable shares (tests/CMakeLists.txt):
// the heavy headers most tests include. Tests still include what they use;
// this only makes the second inclusion free.
#pragma once

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "kvbounce/agent.h"
#include "kvbounce/config.h"
#include "kvbounce/model.h"
#include "kvbounce/status.h"
#include "kvbounce/transports.h"
#include "kvbounce/types.h"
