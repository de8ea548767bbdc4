// Work items spread over torch's intra-op threads.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>

namespace pbs2p {

// The items [0, n) shared by the workers of one parallel_workers call.
class ItemQueue {
 public:
  explicit ItemQueue(int64_t n) : n_(n) {}
  // The next unclaimed item into `i`; false when none is left.
  bool next(int64_t& i) { return (i = next_.fetch_add(1, std::memory_order_relaxed)) < n_; }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t n_;
};

// Runs worker(queue) once on each of min(threads, n) threads of torch's intra-op pool (at::parallel_for, OpenMP
// in torch's CPU builds), or once on the calling thread when threads <= 1 or n == 1; the workers claim the items
// from the shared queue one at a time until none is left, so a thread that starts late takes fewer items. A
// worker can prepare what all its items need (its own tables) before it claims the first. Exceptions thrown by a
// worker are rethrown in the caller (by at::parallel_for).
//
// The same threads as the operators around ours: in a model, torch's OpenMP threads have just run the previous
// operator and are still spinning, so they take items at once. A pool of our own had to wake its threads (a
// futex wake, tens of microseconds on a virtual machine) and competed for the cores with the OpenMP threads
// spinning there (measured on 2 Zen 5 cores, same process, alternating calls: batch-1 4096 x 4096 bf16 0.207 ms
// instead of 0.232, 11008 x 4096 0.556 instead of 0.910; compiled SmolLM2 decode with int8 embeddings 1.08x).
void parallel_workers(int64_t n, int threads, const std::function<void(ItemQueue&)>& worker);

// parallel_workers whose workers run body(i) for each item they claim.
void parallel_items(int64_t n, int threads, const std::function<void(int64_t)>& body);

}  // namespace pbs2p
