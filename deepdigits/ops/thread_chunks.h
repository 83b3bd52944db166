// Work cut into chunks that the calling thread and XLA's intra-op thread pool run in
// turn, for the FFI handlers of deepdigits/ops (onednn_conv.cc, relu_batch_norm.cc).
// A handler that ran a thread team of its own would run beside XLA's threads, which go on
// with other parts of the step: more threads than cores.
#ifndef DEEPDIGITS_OPS_THREAD_CHUNKS_H_
#define DEEPDIGITS_OPS_THREAD_CHUNKS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace deepdigits {

// The work one call shares out: chunk indices taken in turn, and who has finished.
struct Chunks {
  std::function<void(int)> body;  // valid until every chunk is done
  int count = 0;
  std::atomic<int> next{0};
  std::mutex mu;
  std::condition_variable all_done;
  int done = 0;
  std::string error;
};

inline void TakeChunks(const std::shared_ptr<Chunks>& work) {
  for (int i; (i = work->next.fetch_add(1)) < work->count;) {
    std::string error;
    try {
      work->body(i);
    } catch (const std::exception& e) {  // a library's errors, or memory running out
      error = e.what();
    }
    std::lock_guard<std::mutex> lock(work->mu);
    if (!error.empty() && work->error.empty()) work->error = error;
    if (++work->done == work->count) work->all_done.notify_all();
  }
}

// Runs body(0 .. count-1) on this thread and on XLA's intra-op threads, whichever is free
// first; returns when all have run, with the first error, or "". A pool thread that
// comes late finds no chunk left and returns without touching body.
inline std::string RunChunks(xla::ffi::ThreadPool& pool, int count,
                             std::function<void(int)> body) {
  auto work = std::make_shared<Chunks>();
  work->body = std::move(body);
  work->count = count;
  for (int helper = 1; helper < count; ++helper) pool.Schedule([work] { TakeChunks(work); });
  TakeChunks(work);
  std::unique_lock<std::mutex> lock(work->mu);
  work->all_done.wait(lock, [&] { return work->done == work->count; });
  return work->error;
}

// [start, start + size) of `total` rows cut into `parts` near-equal chunks.
struct Range {
  int64_t start, size;
};

inline std::vector<Range> Split(int64_t total, int64_t parts) {
  parts = std::max<int64_t>(1, std::min(parts, total));
  std::vector<Range> ranges;
  for (int64_t i = 0, start = 0; i < parts; ++i) {
    int64_t size = total / parts + (i < total % parts ? 1 : 0);
    ranges.push_back({start, size});
    start += size;
  }
  return ranges;
}

// How many chunks a call's work is cut into: one for each of XLA's intra-op threads.
inline int64_t Threads(xla::ffi::ThreadPool& pool) {
  return std::max<int64_t>(1, pool.num_threads());
}

}  // namespace deepdigits

#endif  // DEEPDIGITS_OPS_THREAD_CHUNKS_H_
