# closewise-check's framing and desync battery (check "framing"), a library
# of its own so that its tests link it without the rest of the tool.
add_library(closewise-check-framing STATIC ${CMAKE_CURRENT_LIST_DIR}/framing.cpp)
closewise_target_options(closewise-check-framing)
# Included as "check/framing.hpp".
target_include_directories(closewise-check-framing PUBLIC $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/apps>)
target_link_libraries(closewise-check-framing PUBLIC closewise-demo-core nlohmann_json::nlohmann_json)
