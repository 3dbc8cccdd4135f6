// Host stand-in for <cuda_bf16.h> (CPU emulator).
#pragma once
#include <cstring>
struct __nv_bfloat16 { unsigned short x; };
inline float __bfloat162float(__nv_bfloat16 h) {
  unsigned b = (unsigned)h.x << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
