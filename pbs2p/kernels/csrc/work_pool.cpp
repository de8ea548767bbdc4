#include "work_pool.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

namespace pbs2p {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

struct Job {
  Job(int64_t n, const std::function<void(int64_t)>* body, bool linger) : n(n), body(body), linger(linger) {}

  // Claims items until none is left. A helper that arrives late claims nothing and never
  // touches `body`, which lives only as long as the caller's call.
  void work() {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      if (!failed.load(std::memory_order_relaxed)) {
        try {
          (*body)(i);
        } catch (...) {
          if (!failed.exchange(true)) error = std::current_exception();
        }
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }

  const int64_t n;
  const std::function<void(int64_t)>* body;
  const bool linger;
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
};

class Pool {
 public:
  // One pool per process; a forked child gets a fresh one (the parent's threads do not exist
  // there and its mutex may have been copied locked).
  static Pool& get() {
    static std::atomic<Pool*> pool{nullptr};
    static std::mutex create;
    Pool* p = pool.load(std::memory_order_acquire);
    if (p == nullptr || p->pid_ != getpid()) {
      std::lock_guard<std::mutex> lock(create);
      p = pool.load(std::memory_order_acquire);
      if (p == nullptr || p->pid_ != getpid()) {
        p = new Pool();  // never freed: detached helpers may still reference it at exit
        pool.store(p, std::memory_order_release);
      }
    }
    return *p;
  }

  void run(int64_t n, int helpers, const std::function<void(int64_t)>& body, bool linger) {
    auto job = std::make_shared<Job>(n, &body, linger);
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (started_ < helpers) {
        std::thread(&Pool::helper, this, started_++).detach();
      }
      job_ = job;
      job_helpers_ = helpers;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    job->work();
    for (int spins = 0; job->done.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < 4096) {
        cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (job_ == job) job_.reset();
    }
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  Pool() : pid_(getpid()) {}

  void helper(int id) {
    using clock = std::chrono::steady_clock;
    uint64_t seen = generation_.load(std::memory_order_acquire);
    bool linger = false;
    for (;;) {
      // Spin a little before sleeping: a model's consecutive linears follow each other closely.
      const auto until = clock::now() + std::chrono::microseconds(kSpinMicros);
      while (linger && generation_.load(std::memory_order_acquire) == seen) {
        for (int i = 0; i < 64; ++i) cpu_relax();
        if (clock::now() > until) break;
      }
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        seen = generation_.load(std::memory_order_relaxed);
        if (id < job_helpers_) job = job_;
      }
      if (job) job->work();
      linger = job && job->linger;
    }
  }

  static constexpr int kSpinMicros = 100;
  const pid_t pid_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Job> job_;  // guarded by mu_
  int job_helpers_ = 0;       // guarded by mu_
  int started_ = 0;           // guarded by mu_
};

}  // namespace

void parallel_items(int64_t n, int threads, const std::function<void(int64_t)>& body, bool linger) {
  if (n <= 0) return;
  if (threads <= 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  Pool::get().run(n, static_cast<int>(std::min<int64_t>(threads - 1, n - 1)), body, linger);
}

}  // namespace pbs2p
