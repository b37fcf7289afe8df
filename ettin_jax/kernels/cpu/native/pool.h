// A parallel-for on the calling thread and XLA's intra-op pool, and aligned scratch buffers, shared by the native
// handlers (screened_argmax.cc, fused_ce.cc, attention.cc, gemm.cc). Tasks are claimed from a shared counter, so the
// caller never waits on a helper that has not started, and a helper that starts after the loop has returned finds
// no task left and touches nothing else (the loop's state is shared with it; `fn` is never called again).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <new>
#include <string>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ettin {

// The most workers ParallelFor uses (the caller included): worker ids are below this.
inline int Workers(xla::ffi::ThreadPool& pool) { return std::max(1, int(pool.num_threads())); }

// fn(task, worker) for every task in [0, tasks), on at most Workers(pool) threads; returns when all are done.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t tasks, std::function<void(int64_t, int)> fn) {
  struct Loop {
    std::function<void(int64_t, int)> fn;
    int64_t tasks = 0;
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<int> workers{0};
    void Work() {
      const int worker = workers.fetch_add(1);
      for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
        fn(t, worker);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto loop = std::make_shared<Loop>();
  loop->fn = std::move(fn), loop->tasks = tasks;
  const int64_t helpers = std::min<int64_t>(Workers(pool), tasks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([loop]() { loop->Work(); });
  loop->Work();
  while (loop->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

// A float buffer of `count` entries aligned to 64 bytes (uninitialised); throws std::bad_alloc when there is no
// memory, which the handlers turn into an error.
struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using Floats = std::unique_ptr<float[], AlignedFree>;
inline Floats Alloc(int64_t count) {
  const size_t bytes = ((size_t(count) * sizeof(float) + 63) / 64) * 64;
  float* p = static_cast<float*>(std::aligned_alloc(64, std::max<size_t>(bytes, 64)));
  if (p == nullptr) throw std::bad_alloc();
  return Floats(p);
}

// Runs fn(); a scratch allocation that fails in it (std::bad_alloc, from Alloc) becomes an XLA error naming `what`
// instead of an exception through the FFI boundary.
template <typename Fn>
xla::ffi::Error OutOfMemoryAsError(const char* what, Fn&& fn) {
  try {
    fn();
  } catch (const std::bad_alloc&) {
    return xla::ffi::Error(xla::ffi::ErrorCode::kResourceExhausted,
                           std::string(what) + ": out of memory for the scratch buffers");
  }
  return xla::ffi::Error::Success();
}

}  // namespace ettin
