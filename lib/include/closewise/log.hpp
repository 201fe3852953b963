#pragma once
// The library's logger. closewise never configures spdlog globally: it logs
// through one named logger ("closewise") that the application may replace.

#include <memory>

#include <spdlog/logger.h>

#include "closewise/export.hpp"
namespace closewise {

/// The logger the library writes to. By default the logger registered under
/// "closewise" if the application registered one, otherwise a private stderr
/// logger at level `warn`. Teardown events log at debug; RSTs and timeouts at info.
/// Thread-safety: safe to call from any thread (no lock: it is on the data path).
CLOSEWISE_API const std::shared_ptr<spdlog::logger>& logger() noexcept;

/// Replaces the library's logger (nullptr restores the default). Call before
/// starting I/O: it is not synchronised with concurrent logging.
CLOSEWISE_API void set_logger(std::shared_ptr<spdlog::logger> l);

}  // namespace closewise
