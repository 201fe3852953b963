# Debian packages (cpack -G DEB; scripts/package builds and checks them), one
# per install component, named as Debian names libraries:
#   libclosewise<SOVERSION>  runtime: the shared libraries. The name carries
#                            the SONAME's version (libclosewise.so.0.1 ->
#                            libclosewise0.1), so two ABIs can be installed
#                            side by side and a tool keeps the one it was
#                            built against.
#   libclosewise-dev         development: headers, the .so links, the CMake
#                            package and closewise.pc; depends on the exact
#                            runtime and on the -dev packages the headers
#                            include (Boost 1.81, spdlog, OpenSSL).
#   closewise-tools          the applications: closewise-reqresp, -echo,
#                            -demo, -lab and the load generator closewise-bench.
# The libraries' and tools' other dependencies come from dpkg-shlibdeps.
set(CPACK_PACKAGE_NAME closewise)
set(CPACK_PACKAGE_VENDOR closewise)
set(CPACK_PACKAGE_CONTACT "The closewise project")
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "${PROJECT_DESCRIPTION}")

set(CPACK_DEB_COMPONENT_INSTALL ON)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
# The tools need libclosewise, which is in no installed package yet: let
# dpkg-shlibdeps find it in the build tree (the Depends on it comes from the
# component dependency below).
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS_PRIVATE_DIRS "${PROJECT_BINARY_DIR}/lib")
set(CPACK_DEBIAN_PACKAGE_GENERATE_SHLIBS ON)
set(CPACK_DEBIAN_ENABLE_COMPONENT_DEPENDS ON)

set(CPACK_DEBIAN_RUNTIME_PACKAGE_NAME libclosewise${CLOSEWISE_SOVERSION})
set(CPACK_DEBIAN_RUNTIME_PACKAGE_SECTION libs)
set(CPACK_COMPONENT_RUNTIME_DESCRIPTION "${PROJECT_DESCRIPTION}: shared libraries")

set(CPACK_DEBIAN_DEVELOPMENT_PACKAGE_NAME libclosewise-dev)
set(CPACK_DEBIAN_DEVELOPMENT_PACKAGE_SECTION libdevel)
set(CPACK_DEBIAN_DEVELOPMENT_PACKAGE_DEPENDS "libboost1.81-dev, libspdlog-dev, libssl-dev")
set(CPACK_COMPONENT_DEVELOPMENT_DESCRIPTION "${PROJECT_DESCRIPTION}: headers, CMake package and pkg-config file")

set(CPACK_DEBIAN_TOOLS_PACKAGE_NAME closewise-tools)
set(CPACK_DEBIAN_TOOLS_PACKAGE_SECTION net)
set(CPACK_COMPONENT_TOOLS_DESCRIPTION
    "${PROJECT_DESCRIPTION}: closewise-reqresp, closewise-echo, closewise-demo, closewise-check, closewise-lab, closewise-bench and closewise-pool-sweep")

if(BUILD_SHARED_LIBS)
  set(CPACK_COMPONENTS_ALL runtime development)
  set(CPACK_COMPONENT_DEVELOPMENT_DEPENDS runtime)
  set(CPACK_COMPONENT_TOOLS_DEPENDS runtime)
else()
  # Static: nothing to install at run time; the tools carry the library.
  set(CPACK_COMPONENTS_ALL development)
endif()
if(CLOSEWISE_BUILD_APPS)
  list(APPEND CPACK_COMPONENTS_ALL tools)
endif()

include(CPack)
