// closewise's error category.
#include <string>

#include "closewise/error.hpp"

namespace closewise {

namespace {

class category final : public boost::system::error_category {
 public:
  const char* name() const noexcept override { return "closewise"; }
  std::string message(int ev) const override {
    switch (static_cast<errc>(ev)) {
      case errc::stale_reuse_not_retried:
        return "request failed on a reused connection before its response and may not be retried";
      case errc::pool_wait_timeout:
        return "no pooled connection became free before the deadline";
      case errc::pool_overloaded:
        return "too many requests wait for a pooled connection";
      case errc::pool_closed:
        return "the connection pool was shut down";
    }
    return "unknown closewise error";
  }
};

}  // namespace

const boost::system::error_category& error_category() noexcept {
  static const category instance;
  return instance;
}

}  // namespace closewise
