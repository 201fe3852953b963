#pragma once
// The one error-code type of closewise's public API: Asio's and Beast's,
// boost::system::error_code (it converts to and from std::error_code).

#include <boost/system/error_code.hpp>

namespace closewise {

using error_code = boost::system::error_code;

}  // namespace closewise
