#include "parallel_items.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

namespace pbs2p {

void parallel_items(int64_t n, int threads, const std::function<void(int64_t)>& body) {
  if (n <= 0) return;
  if (threads <= 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  std::atomic<int64_t> next{0};
  // One chunk per thread (grain 1): each claims items from the shared counter.
  at::parallel_for(0, std::min<int64_t>(threads, n), 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) body(i);
  });
}

}  // namespace pbs2p
