#include "closewise/log.hpp"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace closewise {

namespace {

std::shared_ptr<spdlog::logger> make_default() {
  if (auto registered = spdlog::get("closewise")) return registered;
  // Not registered: the application's spdlog registry stays untouched.
  auto l = std::make_shared<spdlog::logger>("closewise", std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
  l->set_level(spdlog::level::warn);
  return l;
}

std::shared_ptr<spdlog::logger>& slot() {
  static std::shared_ptr<spdlog::logger> current = make_default();
  return current;
}

}  // namespace

const std::shared_ptr<spdlog::logger>& logger() noexcept { return slot(); }

void set_logger(std::shared_ptr<spdlog::logger> l) { slot() = l ? std::move(l) : make_default(); }

}  // namespace closewise
