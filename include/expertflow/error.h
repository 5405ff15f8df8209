// Errors of the native runtime.
//
// Invariants:
// - Every failure the runtime can detect throws expertflow::Error; nothing aborts or exits.
// - The message starts with "file:line: " of the check that failed, so a Python traceback names the
//   native source; the binding layer translates Error into expertflow.ExpertFlowError.
// - Destructors never throw: they call only noexcept release paths.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace expertflow {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
[[noreturn]] inline void throw_error(const char* file, int line, const std::string& message) {
  std::string path(file);
  const auto cut = path.find("csrc/");
  if (cut != std::string::npos) path = path.substr(cut);
  throw Error(path + ":" + std::to_string(line) + ": " + message);
}
}  // namespace detail

}  // namespace expertflow

// EF_CHECK(cond, a << b << ...): throws expertflow::Error with file:line and the streamed message.
#define EF_CHECK(cond, msg)                                                   \
  do {                                                                        \
    if (!(cond)) {                                                            \
      std::ostringstream ef_check_stream_;                                    \
      ef_check_stream_ << msg;                                                \
      ::expertflow::detail::throw_error(__FILE__, __LINE__, ef_check_stream_.str()); \
    }                                                                         \
  } while (0)
