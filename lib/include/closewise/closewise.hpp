#pragma once
// closewise: TCP connection teardown done right. The umbrella header.
//
// core.hpp      the sans-I/O half-close state machine (no Asio)
// report.hpp    close_report: why and how a connection ended
// probe.hpp     the kernel's view of a socket (TCP_INFO, SIOCINQ, SIOCOUTQ)
// sock_diag.hpp TCP sockets as the kernel lists them, TIME_WAIT included
// stream.hpp    basic_stream: an Asio AsyncStream with teardown policies
// server.hpp    server, connection, connect(): sessions, limits, drain
// client_pool.hpp client_pool: kept-alive client connections that see the FIN while idle
// error.hpp     closewise's error codes (stale_reuse_not_retried, ...)
// stats.hpp     teardown statistics as JSON and Prometheus text
// log.hpp       the library's named logger
// version.hpp   the version
//
// http_client.hpp (HTTP/1.1 over client_pool, on Beast) is not included
// here: Beast's HTTP headers are heavy for users of the rest.

#include "closewise/client_pool.hpp"
#include "closewise/core.hpp"
#include "closewise/error.hpp"
#include "closewise/log.hpp"
#include "closewise/probe.hpp"
#include "closewise/report.hpp"
#include "closewise/server.hpp"
#include "closewise/sock_diag.hpp"
#include "closewise/stats.hpp"
#include "closewise/stream.hpp"
#include "closewise/tls.hpp"
#include "closewise/version.hpp"
