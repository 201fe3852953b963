#pragma once
// closewise: TCP connection teardown done right. The umbrella header.
//
// core.hpp      the sans-I/O half-close state machine (no Asio)
// report.hpp    close_report: why and how a connection ended
// probe.hpp     the kernel's view of a socket (TCP_INFO, SIOCINQ, SIOCOUTQ)
// sock_diag.hpp TCP sockets as the kernel lists them, TIME_WAIT included
// stream.hpp    basic_stream: an Asio AsyncStream with teardown policies
// server.hpp    server, connection, connect(): sessions, limits, drain
// stats.hpp     teardown statistics as JSON and Prometheus text
// log.hpp       the library's named logger
// version.hpp   the version

#include "closewise/core.hpp"
#include "closewise/log.hpp"
#include "closewise/probe.hpp"
#include "closewise/report.hpp"
#include "closewise/server.hpp"
#include "closewise/sock_diag.hpp"
#include "closewise/stats.hpp"
#include "closewise/stream.hpp"
#include "closewise/tls.hpp"
#include "closewise/version.hpp"
