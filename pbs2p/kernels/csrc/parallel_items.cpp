#include "parallel_items.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace pbs2p {

void parallel_workers(int64_t n, int threads, const std::function<void(ItemQueue&)>& worker) {
  if (n <= 0) return;
  ItemQueue queue(n);
  if (threads <= 1 || n == 1) {
    worker(queue);
    return;
  }
  // One chunk per thread (grain 1): each runs one worker.
  at::parallel_for(0, std::min<int64_t>(threads, n), 1, [&](int64_t, int64_t) { worker(queue); });
}

void parallel_items(int64_t n, int threads, const std::function<void(int64_t)>& body) {
  parallel_workers(n, threads, [&](ItemQueue& queue) {
    for (int64_t i; queue.next(i);) body(i);
  });
}

}  // namespace pbs2p
