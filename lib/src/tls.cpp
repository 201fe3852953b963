// TLS contexts, throwaway certificates and the handshake's error classes.
#include "closewise/tls.hpp"

#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <memory>
#include <stdexcept>

#include <boost/asio/error.hpp>

namespace closewise {

namespace {

template <class T, void (*F)(T*)>
struct openssl_deleter {
  void operator()(T* p) const noexcept { F(p); }
};
using pkey_ptr = std::unique_ptr<EVP_PKEY, openssl_deleter<EVP_PKEY, EVP_PKEY_free>>;
using x509_ptr = std::unique_ptr<X509, openssl_deleter<X509, X509_free>>;
using bio_ptr = std::unique_ptr<BIO, openssl_deleter<BIO, BIO_free_all>>;
using ext_ptr = std::unique_ptr<X509_EXTENSION, openssl_deleter<X509_EXTENSION, X509_EXTENSION_free>>;

[[noreturn]] void fail(const char* what) {
  const unsigned long e = ::ERR_get_error();
  char buf[256] = {};
  if (e != 0) ::ERR_error_string_n(e, buf, sizeof(buf));
  throw std::runtime_error(std::string("closewise: ") + what + (e != 0 ? std::string(": ") + buf : std::string()));
}

std::string bio_string(BIO* b) {
  char* data = nullptr;
  const long n = BIO_get_mem_data(b, &data);
  return std::string(data, static_cast<std::size_t>(n));
}

constexpr unsigned char http11_wire[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};

// ALPN on a server: http/1.1 when the client offers it; a client that
// offers only other protocols gets no ALPN (not a fatal alert), as nginx does.
int select_http11(SSL*, const unsigned char** out, unsigned char* outlen, const unsigned char* in, unsigned int inlen,
                  void*) {
  unsigned char* selected = nullptr;
  if (::SSL_select_next_proto(&selected, outlen, http11_wire, sizeof(http11_wire), in, inlen) != OPENSSL_NPN_NEGOTIATED)
    return SSL_TLSEXT_ERR_NOACK;
  *out = selected;
  return SSL_TLSEXT_ERR_OK;
}

void apply(asio::ssl::context& ctx, const tls_context_options& o, bool server) {
  SSL_CTX* c = ctx.native_handle();
  int lo = TLS1_2_VERSION, hi = TLS1_3_VERSION;
  if (o.versions == tls_versions::tls12_only) hi = TLS1_2_VERSION;
  if (o.versions == tls_versions::tls13_only) lo = TLS1_3_VERSION;
  if (::SSL_CTX_set_min_proto_version(c, lo) != 1 || ::SSL_CTX_set_max_proto_version(c, hi) != 1)
    fail("setting the protocol versions");
  ::SSL_CTX_set_options(c, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
  ::SSL_CTX_clear_options(c, SSL_OP_IGNORE_UNEXPECTED_EOF);  // a bare FIN must stay visible
  // No chain built from the trust store at every handshake: the chain sent
  // is the one the certificate file holds (nginx sets the same).
  ::SSL_CTX_set_mode(c, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_NO_AUTO_CHAIN);
  if (server) {
    ::SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_OFF);
    if (!o.session_tickets) {
      ::SSL_CTX_set_options(c, SSL_OP_NO_TICKET);
      if (::SSL_CTX_set_num_tickets(c, 0) != 1) fail("turning session tickets off");
    }
  }
  if (o.alpn_http11) {
    if (server) {
      ::SSL_CTX_set_alpn_select_cb(c, select_http11, nullptr);
    } else if (::SSL_CTX_set_alpn_protos(c, http11_wire, sizeof(http11_wire)) != 0) {
      fail("setting ALPN");
    }
  }
}

}  // namespace

certificate_pem make_self_signed_certificate(const std::string& common_name) {
  pkey_ptr key(::EVP_EC_gen("P-256"));
  if (!key) fail("generating a P-256 key");
  x509_ptr cert(::X509_new());
  if (!cert) fail("allocating a certificate");
  ::X509_set_version(cert.get(), 2);
  ::ASN1_INTEGER_set(::X509_get_serialNumber(cert.get()), 1);
  ::X509_gmtime_adj(::X509_getm_notBefore(cert.get()), -3600);
  ::X509_gmtime_adj(::X509_getm_notAfter(cert.get()), 24 * 3600);
  ::X509_set_pubkey(cert.get(), key.get());
  X509_NAME* name = ::X509_get_subject_name(cert.get());
  ::X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(common_name.c_str()),
                               -1, -1, 0);
  ::X509_set_issuer_name(cert.get(), name);
  X509V3_CTX v3;
  X509V3_set_ctx_nodb(&v3);
  ::X509V3_set_ctx(&v3, cert.get(), cert.get(), nullptr, nullptr, 0);
  const std::string san = "DNS:" + common_name + ",IP:127.0.0.1,IP:::1";
  ext_ptr ext(::X509V3_EXT_conf_nid(nullptr, &v3, NID_subject_alt_name, san.c_str()));
  if (!ext || ::X509_add_ext(cert.get(), ext.get(), -1) != 1) fail("adding the subject alternative name");
  if (::X509_sign(cert.get(), key.get(), ::EVP_sha256()) == 0) fail("signing the certificate");

  certificate_pem out;
  bio_ptr cb(::BIO_new(::BIO_s_mem()));
  bio_ptr kb(::BIO_new(::BIO_s_mem()));
  if (!cb || !kb || ::PEM_write_bio_X509(cb.get(), cert.get()) != 1 ||
      ::PEM_write_bio_PrivateKey(kb.get(), key.get(), nullptr, nullptr, 0, nullptr, nullptr) != 1)
    fail("encoding the certificate");
  out.certificate = bio_string(cb.get());
  out.private_key = bio_string(kb.get());
  return out;
}

asio::ssl::context make_server_context(const certificate_pem& pem, const tls_context_options& o) {
  asio::ssl::context ctx(asio::ssl::context::tls_server);
  apply(ctx, o, true);
  ctx.use_certificate_chain(asio::buffer(pem.certificate));
  ctx.use_private_key(asio::buffer(pem.private_key), asio::ssl::context::pem);
  return ctx;
}

asio::ssl::context make_server_context_from_files(const std::string& certificate_file, const std::string& key_file,
                                                  const tls_context_options& o) {
  asio::ssl::context ctx(asio::ssl::context::tls_server);
  apply(ctx, o, true);
  ctx.use_certificate_chain_file(certificate_file);
  ctx.use_private_key_file(key_file, asio::ssl::context::pem);
  return ctx;
}

asio::ssl::context make_client_context(const std::string& trust, const tls_context_options& o) {
  asio::ssl::context ctx(asio::ssl::context::tls_client);
  apply(ctx, o, false);
  if (trust.empty()) {
    ctx.set_verify_mode(asio::ssl::verify_none);
  } else {
    ctx.add_certificate_authority(asio::buffer(trust));
    ctx.set_verify_mode(asio::ssl::verify_peer);
  }
  return ctx;
}

tls_handshake classify_handshake_error(const error_code& ec) noexcept {
  if (ec == asio::error::eof || ec == asio::ssl::error::stream_truncated || ec == asio::error::connection_reset ||
      ec == asio::error::broken_pipe)
    return tls_handshake::peer_closed;
  if (ec == asio::error::timed_out) return tls_handshake::timeout;
  if (ec.category() != asio::error::get_ssl_category()) return tls_handshake::error;
  const int reason = ERR_GET_REASON(static_cast<unsigned long>(ec.value()));
  switch (reason) {
    case SSL_R_HTTP_REQUEST:
    case SSL_R_HTTPS_PROXY_REQUEST:
      return tls_handshake::plaintext_http;
    case SSL_R_WRONG_VERSION_NUMBER:
    case SSL_R_UNSUPPORTED_PROTOCOL:
    case SSL_R_VERSION_TOO_LOW:
    case SSL_R_VERSION_TOO_HIGH:
    case SSL_R_UNKNOWN_PROTOCOL:
    case SSL_R_TLSV1_ALERT_PROTOCOL_VERSION:
      return tls_handshake::wrong_version;
    default:
      break;
  }
  // Alerts the peer sent arrive as reason SSL_AD_REASON_OFFSET + the alert.
  if (reason >= SSL_AD_REASON_OFFSET && reason < SSL_AD_REASON_OFFSET + 256) return tls_handshake::alert_received;
  return tls_handshake::error;
}

}  // namespace closewise
