#pragma once
// The checked-in fuzz inputs, for the tests that replay them without
// libFuzzer: fuzz/corpus/<target>/* and fuzz/regressions/<target>/*, by
// target (dot files such as .gitkeep are not inputs).

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

namespace closewise::test {

inline std::vector<std::uint8_t> read_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// Every input under `fuzz_dir`, by target name.
inline std::map<std::string, std::vector<std::filesystem::path>> inputs_by_target(
    const std::filesystem::path& fuzz_dir) {
  namespace fs = std::filesystem;
  std::map<std::string, std::vector<fs::path>> out;
  for (const char* kind : {"corpus", "regressions"}) {
    const fs::path root = fuzz_dir / kind;
    if (!fs::is_directory(root)) continue;
    for (const auto& target : fs::directory_iterator(root)) {
      if (!target.is_directory()) continue;
      auto& files = out[target.path().filename().string()];
      for (const auto& f : fs::directory_iterator(target.path())) {
        if (f.is_regular_file() && f.path().filename().string().front() != '.') files.push_back(f.path());
      }
    }
  }
  return out;
}

}  // namespace closewise::test
