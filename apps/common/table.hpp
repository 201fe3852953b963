#pragma once
// The text tables closewise-demo and closewise-lab print: fixed-width
// columns, each cell wrapped into its column, rows between rules of dashes.
//
// Thread-safety: plain functions; no shared state.

#include <cstddef>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

namespace closewise::app {

/// Splits `text` into lines of at most `width` columns, at spaces where it
/// can; '\n' forces a break, and a word wider than the column is cut. Always
/// at least one line (empty for an empty text).
std::vector<std::string> wrap(std::string_view text, std::size_t width);

/// One column of a table: its title (wrapped like the cells) and its width.
struct table_column {
  std::string_view title;
  std::size_t width;
};

/// Prints the titles, then each row (one text per column) below a rule, and a
/// final rule. Columns are two spaces apart; lines carry no trailing spaces.
void print_table(std::ostream& out, const std::vector<table_column>& cols,
                 const std::vector<std::vector<std::string>>& rows);

}  // namespace closewise::app
