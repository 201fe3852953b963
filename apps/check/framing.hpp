#pragma once
// closewise-check's framing and desync battery (check "framing"): requests
// whose framing RFC 9112 makes ambiguous or invalid (CL.CL, Content-Length
// lists, CL.TE, obfuscated Transfer-Encoding, bad chunk sizes, bare CR, NUL,
// obs-fold, whitespace before the first header, ...), each sent on its own
// connection with a second request hidden where only a wrong framing would
// find it. Each case is graded on its own: a desync (the server executed bytes
// that belong to a body) fails; leniency (a malformed request accepted but
// framed consistently) is reported and passes; a rejection (400, or a close)
// passes.
//
// How a case tells: after the malformed request and the hidden one comes a
// final "GET /" with Connection: close, so a server that frames the bytes
// consistently answers exactly twice and closes, and one that executed the
// hidden request answers three times (or refuses body bytes with a 400 after
// its first answer). A case waits at most min(wait_limit, 2 s) for the
// server's answers and close; a server that answers nothing in that time is
// reported "unanswered" (nothing was executed, so it passes).
//
// Thread-safety: as check.hpp.

#include <string>
#include <vector>

#include "check/check.hpp"

namespace closewise::check {

/// One case of the battery: its name and the bytes it sends.
struct framing_case {
  std::string name;  ///< "cl-te", "te-obfuscated-space", ...
  std::string rfc;   ///< the rule it tests: "RFC 9112 6.3 (3)"
  std::string what;  ///< one line: what is wrong with it
};
/// The cases, in the order the battery runs them.
const std::vector<framing_case>& framing_cases();

/// Runs the battery against `opts.target`; the row's `cases` hold one row
/// per case. Fails when any case desyncs.
row check_framing(const options& opts);

/// Runs the one case named `name` (as check_framing would) and returns its
/// row; a row with verdict::skip when no case has that name.
row check_framing_case(const std::string& name, const options& opts);

}  // namespace closewise::check
