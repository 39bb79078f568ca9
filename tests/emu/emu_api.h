// Shared by the C entry points (emu_api.cpp, emu_gemm.cpp): each returns 0, or -1 with the
// exception's message in emu_last_error().
#pragma once

#include <exception>
#include <string>

extern std::string emu_api_error;

template <typename F>
int emu_guarded(F&& f) {
  try {
    emu_api_error.clear();
    f();
    return 0;
  } catch (const std::exception& e) {
    emu_api_error = e.what();
    return -1;
  }
}
