#pragma once
// The one error-code type of closewise's public API: Asio's and Beast's,
// boost::system::error_code (it converts to and from std::error_code), and
// closewise's own errors, in the category "closewise".

#include <type_traits>

#include <boost/system/error_code.hpp>

#include "closewise/export.hpp"

namespace closewise {

using error_code = boost::system::error_code;

/// The errors closewise itself reports (the rest are Asio's, Beast's or the
/// system's). Values of the category `error_category()`.
enum class errc : int {
  /// A request failed on a reused keep-alive connection before any byte of
  /// its response arrived (the server's FIN or RST crossed it), and it may
  /// not be sent again: neither idempotent (RFC 9110 section 9.2.2) nor
  /// carrying an Idempotency-Key. The server may or may not have executed it.
  stale_reuse_not_retried = 1,
  /// No connection to the target became free before the waiter's deadline
  /// (pool_options::wait_timeout or the request's own).
  pool_wait_timeout,
  /// Too many requests already wait for a connection to the target
  /// (pool_options::max_waiters): refused at once, as backpressure.
  pool_overloaded,
  /// The pool was shut down.
  pool_closed,
};

/// The category of closewise::errc ("closewise"). Thread-safe.
CLOSEWISE_API const boost::system::error_category& error_category() noexcept;

/// error_code{e, error_category()}.
inline error_code make_error_code(errc e) noexcept { return {static_cast<int>(e), error_category()}; }

}  // namespace closewise

template <>
struct boost::system::is_error_code_enum<closewise::errc> : std::true_type {};
