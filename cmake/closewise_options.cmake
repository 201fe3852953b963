# Warnings and sanitizers as target options: nothing here touches global flags.

function(closewise_target_options target)
  target_compile_features(${target} PUBLIC cxx_std_20)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic)
  if(CLOSEWISE_WARNINGS_AS_ERRORS)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
  if(CLOSEWISE_SANITIZE)
    target_compile_options(${target} PRIVATE -fsanitize=${CLOSEWISE_SANITIZE} -fno-omit-frame-pointer
                                             -fno-sanitize-recover=all)
    target_link_options(${target} PRIVATE -fsanitize=${CLOSEWISE_SANITIZE})
  endif()
endfunction()
