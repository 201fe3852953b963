#include "table.hpp"

#include <algorithm>
#include <utility>

namespace closewise::app {

std::vector<std::string> wrap(std::string_view text, std::size_t width) {
  std::vector<std::string> lines;
  std::string line;
  auto flush = [&] {
    lines.push_back(std::move(line));
    line.clear();
  };
  std::size_t i = 0;
  while (i < text.size()) {
    if (text[i] == '\n') {
      flush();
      ++i;
      continue;
    }
    if (text[i] == ' ') {
      ++i;
      continue;
    }
    std::size_t end = text.find_first_of(" \n", i);
    if (end == std::string_view::npos) end = text.size();
    std::string_view word = text.substr(i, end - i);
    i = end;
    while (!word.empty()) {
      const std::size_t need = line.empty() ? word.size() : line.size() + 1 + word.size();
      if (need <= width) {
        if (!line.empty()) line += ' ';
        line += word;
        word = {};
      } else if (!line.empty()) {
        flush();
      } else {  // a word wider than the column: cut it
        line = word.substr(0, width);
        word.remove_prefix(width);
        flush();
      }
    }
  }
  if (!line.empty() || lines.empty()) flush();
  return lines;
}

void print_table(std::ostream& out, const std::vector<table_column>& cols,
                 const std::vector<std::vector<std::string>>& rows) {
  // One table row: its cells' wrapped lines side by side.
  auto print_line = [&](const std::vector<std::vector<std::string>>& cells) {
    std::size_t height = 0;
    for (const auto& c : cells) height = std::max(height, c.size());
    for (std::size_t line = 0; line < height; ++line) {
      std::string text;
      for (std::size_t c = 0; c < cols.size(); ++c) {
        const std::string& cell = line < cells[c].size() ? cells[c][line] : std::string{};
        text += cell;
        if (c + 1 < cols.size()) text += std::string(cols[c].width - std::min(cols[c].width, cell.size()) + 2, ' ');
      }
      while (!text.empty() && text.back() == ' ') text.pop_back();
      out << text << '\n';
    }
  };
  std::size_t total = 0;
  for (const auto& c : cols) total += c.width + 2;
  const std::string rule(total - 2, '-');

  std::vector<std::vector<std::string>> header;
  for (const auto& c : cols) header.push_back(wrap(c.title, c.width));
  print_line(header);
  for (const auto& texts : rows) {
    out << rule << '\n';
    std::vector<std::vector<std::string>> cells;
    for (std::size_t c = 0; c < cols.size(); ++c) {
      cells.push_back(wrap(c < texts.size() ? std::string_view(texts[c]) : std::string_view{}, cols[c].width));
    }
    print_line(cells);
  }
  out << rule << '\n';
}

}  // namespace closewise::app
