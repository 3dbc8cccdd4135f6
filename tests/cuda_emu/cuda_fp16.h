// Host stand-in for <cuda_fp16.h>: just enough for kernels/cuda/sampling.cu under the CPU emulator.
#pragma once
#include <cstring>
struct __half { unsigned short x; };
inline float __half2float(__half h) {
  unsigned s = (h.x >> 15) & 1, e = (h.x >> 10) & 31, m = h.x & 1023, bits;
  if (e == 0) {
    if (m == 0) { bits = s << 31; }
    else { e = 113; while (!(m & 1024)) { m <<= 1; --e; } m &= 1023; bits = (s << 31) | (e << 23) | (m << 13); }
  } else if (e == 31) { bits = (s << 31) | (255u << 23) | (m << 13); }
  else { bits = (s << 31) | ((e + 112) << 23) | (m << 13); }
  float f; std::memcpy(&f, &bits, 4); return f;
}
