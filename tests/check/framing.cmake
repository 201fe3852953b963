# closewise-check's framing battery against a deliberately lenient server
# (which it must catch desyncing) and an in-process closewise-reqresp (which
# must pass every case).
add_executable(closewise-check-framing-tests ${CMAKE_CURRENT_LIST_DIR}/framing_test.cpp)
closewise_target_options(closewise-check-framing-tests)
target_link_libraries(closewise-check-framing-tests PRIVATE closewise-check-framing closewise-reqresp-core
                      closewise-test-support GTest::gtest GTest::gtest_main)
gtest_discover_tests(closewise-check-framing-tests DISCOVERY_TIMEOUT 60 PROPERTIES LABELS check)
