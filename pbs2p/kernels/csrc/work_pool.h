// A small pool of helper threads that never makes the caller wait for a thread to start.
#pragma once

#include <cstdint>
#include <functional>

namespace pbs2p {

// Runs body(i) for every i in [0, n) on the calling thread and up to `threads - 1` helper threads.
// Items are claimed one at a time and the call returns once every claimed item is done, so a
// helper the OS has not scheduled yet (a busy or shared machine) costs nothing: the caller takes
// the remaining items itself. Exceptions thrown by `body` are rethrown in the caller.
//
// OpenMP (at::parallel_for) ends every region with a barrier that waits for all its threads;
// with other processes on the cores that wait is a scheduler time slice (milliseconds), more
// than a whole batch-1 matrix-vector product.
void parallel_items(int64_t n, int threads, const std::function<void(int64_t)>& body, bool linger = true);

}  // namespace pbs2p
