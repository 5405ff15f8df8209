// Errors of the native runtime.
//
// Invariants:
// - Every failure the runtime can detect throws expertflow::Error; nothing aborts or exits.
// - The message starts with "file:line: " of the check that failed, so a Python traceback names the
//   native source; the binding layer translates Error into expertflow.ExpertFlowError.
// - Destructors never throw: they call only noexcept release paths.
#pragma once

#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace expertflow {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

// Builds error messages without iostreams: number formatting through std::ostream reads the
// process-wide locale facets, which crashed where the host process had loaded another libstdc++
// build first (seen on the H200 image beside torch). to_string / snprintf need no facets.
class Message {
 public:
  Message& operator<<(const std::string& s) {
    text_ += s;
    return *this;
  }
  Message& operator<<(const char* s) {
    text_ += s;
    return *this;
  }
  Message& operator<<(char c) {
    text_ += c;
    return *this;
  }
  template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
  Message& operator<<(T value) {
    text_ += std::to_string(value);
    return *this;
  }
  template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
  Message& operator<<(T value) {
    char buffer[32];
    std::snprintf(buffer, sizeof(buffer), "%g", static_cast<double>(value));
    text_ += buffer;
    return *this;
  }
  const std::string& str() const { return text_; }

 private:
  std::string text_;
};

[[noreturn]] inline void throw_error(const char* file, int line, const std::string& message) {
  std::string path(file);
  const auto cut = path.find("csrc/");
  if (cut != std::string::npos) path = path.substr(cut);
  throw Error(path + ":" + std::to_string(line) + ": " + message);
}
}  // namespace detail

}  // namespace expertflow

// EF_CHECK(cond, a << b << ...): throws expertflow::Error with file:line and the streamed message.
#define EF_CHECK(cond, msg)                                                      \
  do {                                                                           \
    if (!(cond)) {                                                               \
      ::expertflow::detail::Message ef_check_message_;                           \
      ef_check_message_ << msg;                                                  \
      ::expertflow::detail::throw_error(__FILE__, __LINE__, ef_check_message_.str()); \
    }                                                                            \
  } while (0)
