// CPU emulator of the CUDA execution model, for testing the *logic* of kernels/cuda/*.cu on a machine without a
// GPU (compiled with g++; see tests/cuda_emu/emu.cpp for the sampler, emu_moe.cpp for the MoE routing/alignment).
//
// A launch runs its blocks one after another (a legal CUDA schedule); each block runs as blockDim.x std::threads:
//   - __syncthreads: a real barrier over the block's live threads;
//   - warp shuffles (__shfl_xor_sync, __shfl_sync): a barrier over the warp's live lanes around a shared exchange
//     buffer (so warps may diverge from each other, e.g. whole warps that return early);
//   - a thread whose kernel returns leaves both barriers (as an exited CUDA thread stops counting for them);
//   - atomicAdd: a host atomic; __shared__: a function-local static (one block at a time, so one copy suffices).
// Only uniform control flow inside a warp around shuffles is supported (as the kernels under test use them).
// Not emulated: memory-model subtleties beyond sequential consistency, timing, warp-synchronous code without
// shuffles.
#pragma once

#include <math.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __CUDACC_RTC__ 1  // the sources skip their C-ABI launchers (they need the CUDA runtime)
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static

struct Dim3 { unsigned x = 0; };
static thread_local Dim3 threadIdx, blockIdx;
static Dim3 blockDim, gridDim;

namespace emu {

// A reusable barrier whose party count shrinks when a party leaves for good.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lk(m_);
    const int gen = gen_;
    if (++count_ == n_) { release(); return; }
    cv_.wait(lk, [&] { return gen != gen_; });
  }
  void leave() {
    std::unique_lock<std::mutex> lk(m_);
    if (--n_ > 0 && count_ == n_) release();
  }
 private:
  void release() { count_ = 0; ++gen_; cv_.notify_all(); }
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0, gen_ = 0;
};

struct Block {
  std::unique_ptr<Barrier> all;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<long long> xchg;
};
static Block* g_block = nullptr;

// Runs fn() as the kernel body of grid x block threads.
inline void launch(unsigned grid, unsigned block, const std::function<void()>& fn) {
  gridDim.x = grid;
  blockDim.x = block;
  for (unsigned b = 0; b < grid; ++b) {
    Block blk;
    blk.all.reset(new Barrier((int)block));
    for (unsigned w = 0; w < (block + 31) / 32; ++w)
      blk.warps.emplace_back(new Barrier((int)std::min(32u, block - 32 * w)));
    blk.xchg.assign(block, 0);
    g_block = &blk;
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t)
      threads.emplace_back([&fn, &blk, b, t] {
        threadIdx.x = t;
        blockIdx.x = b;
        fn();
        blk.warps[t / 32]->leave();
        blk.all->leave();
      });
    for (auto& th : threads) th.join();
    g_block = nullptr;
  }
}

template <typename T>
inline T shuffle(T v, int src_lane) {
  long long w = 0;
  std::memcpy(&w, &v, sizeof(T));
  const unsigned t = threadIdx.x;
  Barrier& warp = *g_block->warps[t / 32];
  warp.wait();  // every lane has read the previous shuffle's values
  g_block->xchg[t] = w;
  warp.wait();  // every lane has written
  const long long r = g_block->xchg[(t & ~31u) | (unsigned)(src_lane & 31)];
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

}  // namespace emu

static inline void __syncthreads() { emu::g_block->all->wait(); }
template <typename T> static inline T __shfl_xor_sync(unsigned, T v, int o) {
  return emu::shuffle(v, (int)(threadIdx.x & 31) ^ o);
}
template <typename T> static inline T __shfl_sync(unsigned, T v, int src) { return emu::shuffle(v, src); }
template <typename T> static inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
static inline float __int_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
