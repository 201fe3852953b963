# Warnings and sanitizers as target options: nothing here touches global flags.

# CLOSEWISE_SANITIZE is declared by the top-level CMakeLists.txt; offer its
# values in cmake-gui/ccmake and reject a combination that cannot link.
if(DEFINED CACHE{CLOSEWISE_SANITIZE})
  set_property(CACHE CLOSEWISE_SANITIZE PROPERTY STRINGS "" "address,undefined" "address" "undefined" "thread")
endif()
if(CLOSEWISE_SANITIZE MATCHES "thread" AND CLOSEWISE_SANITIZE MATCHES "address")
  message(FATAL_ERROR "CLOSEWISE_SANITIZE='${CLOSEWISE_SANITIZE}': ThreadSanitizer cannot be combined with AddressSanitizer")
endif()

function(closewise_target_options target)
  target_compile_features(${target} PUBLIC cxx_std_20)
  # -std=c++20, not gnu++20: the code must not lean on GNU language extensions.
  set_target_properties(${target} PROPERTIES CXX_EXTENSIONS OFF)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    # g++ 12 at -O1 and above sees Asio's awaitable frames freed by the frame's
    # own operator delete after an aligned_alloc in its recycling allocator,
    # and calls it a mismatch: a false positive on every coroutine.
    target_compile_options(${target} PRIVATE -Wno-mismatched-new-delete)
    # g++ 12 with optimisation and -fsanitize=thread flags std::string's own
    # operator+ with -Warray-bounds (GCC PR 105329 and kin); keep the warning,
    # but not as an error there.
    if(CLOSEWISE_SANITIZE)
      target_compile_options(${target} PRIVATE -Wno-error=array-bounds)
    endif()
  endif()
  if(CLOSEWISE_WARNINGS_AS_ERRORS)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
  if(CLOSEWISE_SANITIZE)
    target_compile_options(${target} PRIVATE -fsanitize=${CLOSEWISE_SANITIZE} -fno-omit-frame-pointer
                                             -fno-sanitize-recover=all)
    target_link_options(${target} PRIVATE -fsanitize=${CLOSEWISE_SANITIZE})
    if(CLOSEWISE_SANITIZE MATCHES "thread" AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
      # libstdc++'s std::atomic_thread_fence (used by Asio and GoogleTest)
      # draws -Wtsan from g++ 12: a warning about TSan's model, not our code.
      target_compile_options(${target} PRIVATE -Wno-tsan)
    endif()
  endif()
endfunction()
