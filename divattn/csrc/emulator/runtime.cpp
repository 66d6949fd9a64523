// The emulator's runtime: blocks of fibers, the collectives they meet at, the checks and
// the counters (see cuda_shim.h for what is emulated and how).
//
// One block runs at a time, on the calling thread. Every CUDA thread of the block is a
// fiber with its own stack (x86-64: a 20-instruction context switch below; elsewhere, or
// with DIVATTN_EMU_UCONTEXT, swapcontext). The scheduler runs one warp at a time as far as
// it can go, to the next __syncthreads (warps in ascending order in even phases between
// barriers, descending in odd ones), so warps drift as far apart as the barriers allow:
// one reads a buffer before the others filled it, or refills it before they read it,
// wherever a barrier is missing. Within the warp each ready lane runs until it blocks at a
// warp collective, lanes in ascending order on even rounds and descending on odd ones. A
// collective completes when the last of its participants arrives (the block for
// __syncthreads, the warp for the others); that fiber carries on, the others are ready
// again. A fiber that throws (a failed check) ends the launch with
// the error's sentence; the other fibers of the block are dropped where they stand.
#include "cuda_shim.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <exception>
#include <map>
#include <string>
#include <vector>

#if !defined(__x86_64__) || defined(DIVATTN_EMU_UCONTEXT)
#define DIVATTN_EMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace emu {
namespace {

// ------------------------------------------------------------------ context switching

#ifndef DIVATTN_EMU_USE_UCONTEXT
extern "C" void divattn_emu_switch(void** save_sp, void* load_sp);
extern "C" void divattn_emu_trampoline();
// Saves the callee-saved registers, the x87 control word and MXCSR on the current stack,
// stores the stack pointer in *save_sp, and resumes the context saved at load_sp.
asm(R"(
    .text
    .p2align 4
    .globl divattn_emu_switch
    .hidden divattn_emu_switch
    .type divattn_emu_switch, @function
divattn_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    fnstcw (%rsp)
    stmxcsr 8(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    fldcw (%rsp)
    ldmxcsr 8(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size divattn_emu_switch, .-divattn_emu_switch

    .p2align 4
    .globl divattn_emu_trampoline
    .hidden divattn_emu_trampoline
    .type divattn_emu_trampoline, @function
divattn_emu_trampoline:
    movq %r12, %rdi
    andq $-16, %rsp
    callq *%r13
    ud2
    .size divattn_emu_trampoline, .-divattn_emu_trampoline
)");

struct Context {
  void* sp = nullptr;
};

// A context that starts entry(arg) on the given stack when first switched to.
void make_context(Context& c, char* stack, size_t size, void (*entry)(void*), void* arg) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t{15};
  auto* frame = reinterpret_cast<uint64_t*>(top - 80);
  uint16_t fpcw;
  uint32_t mxcsr;
  asm volatile("fnstcw %0" : "=m"(fpcw));
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  std::memset(frame, 0, 80);
  std::memcpy(&frame[0], &fpcw, sizeof fpcw);
  std::memcpy(&frame[1], &mxcsr, sizeof mxcsr);
  frame[4] = reinterpret_cast<uint64_t>(entry);  // r13
  frame[5] = reinterpret_cast<uint64_t>(arg);    // r12
  frame[8] = reinterpret_cast<uint64_t>(&divattn_emu_trampoline);  // return address
  c.sp = frame;
}

void switch_context(Context& from, Context& to) { divattn_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void* g_entry_arg = nullptr;
void (*g_entry)(void*) = nullptr;

void ucontext_entry() { g_entry(g_entry_arg); }

void make_context(Context& c, char* stack, size_t size, void (*entry)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  g_entry = entry;
  makecontext(&c.uc, ucontext_entry, 0);
  (void)arg;
}

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ------------------------------------------------------------------ state

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kMaxDynamicSmem = 166912;  // sm_80's most per block (sm_90 allows 232448)
constexpr size_t kDefaultDynamicSmem = 48 * 1024;

// A failed check inside a fiber, with its sentence.
struct Failure : std::exception {
  std::string msg;
  explicit Failure(std::string m) : msg(std::move(m)) {}
  const char* what() const noexcept override { return msg.c_str(); }
};

enum class State { ready, at_barrier, at_warp, done };
enum class Kind { none, syncwarp, shfl, ldmatrix, mma };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::syncwarp: return "__syncwarp";
    case Kind::shfl: return "a warp shuffle";
    case Kind::ldmatrix: return "ldmatrix";
    case Kind::mma: return "mma.sync";
    default: return "nothing";
  }
}

struct Copy {
  char* dst;
  const char* src;
  int cp_size, src_size;
};

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  int tid = 0, warp = 0, lane = 0;
  uint3 idx{0, 0, 0};
  State state = State::ready;
  // this lane's operands and results of the warp collective it waits at
  uint64_t shfl_in = 0, shfl_out = 0;
  int shfl_arg = 0;
  const void* row = nullptr;
  uint32_t a[4]{}, b[2]{}, r[4]{};
  float c[4]{}, d[4]{};
  std::vector<Copy> open;                  // cp.async since the last commit
  std::deque<std::vector<Copy>> groups;    // committed, not yet waited for
};

struct Warp {
  int arrived = 0;
  Kind kind = Kind::none;
};

// The global memory a launch may touch: the binding registers every tensor it passes.
struct Range {
  uintptr_t begin, end;
  bool writable;
};

struct LaunchRecord {
  std::string name;
  dim3 grid, block;
  size_t smem = 0;
  uint64_t blocks = 0, load_sectors = 0, store_sectors = 0, unique_load_sectors = 0, unique_store_sectors = 0;
  uint64_t ldmatrix = 0, ldmatrix_wavefronts = 0, mma = 0, cp_async = 0, barriers = 0;
};

struct Runtime {
  // the launch
  const char* name = "";
  Body body{};
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Context scheduler;
  Fiber* current = nullptr;
  int alive = 0, at_barrier = 0;
  std::string error;
  // the block's (dynamic) shared memory
  std::vector<char> smem;
  size_t smem_bytes = 0;
  // checks and counters
  std::vector<Range> ranges;
  std::map<const void*, int> max_dynamic_smem;
  bool counting = false;
  std::vector<uint64_t> block_loads, block_stores, launch_loads, launch_stores;
  LaunchRecord record;
  std::vector<LaunchRecord> records;
  std::string records_json;
  cudaError_t last_error = cudaSuccess;
  std::string last_message;
};

Runtime& rt() {
  static Runtime r;
  return r;
}

}  // namespace
}  // namespace emu

namespace emu {
namespace {

std::string where(const Fiber* f) {
  char buf[200];
  const Runtime& r = rt();
  if (f == nullptr) {
    std::snprintf(buf, sizeof buf, "%s block (%u, %u, %u)", r.name, blockIdx.x, blockIdx.y, blockIdx.z);
  } else {
    std::snprintf(buf, sizeof buf, "%s block (%u, %u, %u) thread %d (warp %d, lane %d)", r.name, blockIdx.x,
                  blockIdx.y, blockIdx.z, f->tid, f->warp, f->lane);
  }
  return buf;
}

[[noreturn]] void fail(const std::string& what) { throw Failure(where(rt().current) + ": " + what); }

Fiber& me() {
  Fiber* f = rt().current;
  if (f == nullptr) throw Failure("a device function of the emulator was called outside a kernel launch");
  return *f;
}

void yield() {
  Runtime& r = rt();
  Fiber* f = r.current;
  switch_context(f->ctx, r.scheduler);
}

void fiber_main(void* arg) {
  auto* f = static_cast<Fiber*>(arg);
  Runtime& r = rt();
  try {
    r.body.call(r.body.ctx);
  } catch (const Failure& e) {
    if (r.error.empty()) r.error = e.msg;
  } catch (const std::exception& e) {
    if (r.error.empty()) r.error = where(f) + ": " + e.what();
  }
  f->state = State::done;
  --r.alive;
  if (r.error.empty()) {
    const Warp& w = r.warps[f->warp];
    if (w.arrived > 0) {
      r.error = where(f) + ": returned while its warp waits at " + kind_name(w.kind) +
                " (a full-warp collective needs all 32 lanes)";
    } else if (r.at_barrier > 0 && r.at_barrier == r.alive) {
      for (Fiber& g : r.fibers) {
        if (g.state == State::at_barrier) g.state = State::ready;
      }
      r.at_barrier = 0;
    }
  }
  switch_context(f->ctx, r.scheduler);
  std::abort();  // a finished fiber is never resumed
}

struct StackPool {
  std::vector<char*> stacks;
  char* get(size_t i) {
    while (stacks.size() <= i) {
      const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
      void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (m == MAP_FAILED) throw std::bad_alloc();
      mprotect(m, page, PROT_NONE);  // a guard page below each stack: an overflow faults
      stacks.push_back(static_cast<char*>(m) + page);
    }
    return stacks[i];
  }
};

StackPool& stacks() {
  static StackPool p;
  return p;
}

void record_sectors(std::vector<uint64_t>& book, const void* p, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (uintptr_t s = a / 32; s <= (a + bytes - 1) / 32; ++s) book.push_back(s);
}

void check_global(const void* p, size_t bytes, bool write) {
  Runtime& r = rt();
  if (r.ranges.empty() || bytes == 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  bool inside = false;
  for (const Range& g : r.ranges) {
    if (a >= g.begin && a + bytes <= g.end) {
      if (!write || g.writable) return;
      inside = true;
    }
  }
  char buf[160];
  std::snprintf(buf, sizeof buf, "global %s of %zu bytes at %#" PRIxPTR " %s", write ? "write" : "read", bytes, a,
                inside ? "into a tensor the kernel only reads" : "outside every tensor the launch was given");
  fail(buf);
}

bool in_smem(const void* p, size_t bytes) {
  Runtime& r = rt();
  const char* c = static_cast<const char*>(p);
  return c >= r.smem.data() && c + bytes <= r.smem.data() + r.smem_bytes;
}

size_t unique_count(std::vector<uint64_t>& v) {
  std::sort(v.begin(), v.end());
  return static_cast<size_t>(std::unique(v.begin(), v.end()) - v.begin());
}

// Wait at a warp collective of this kind; returns once it completed. `resolve` runs in
// the fiber of the last lane to arrive. (Call sites are not compared: the compiler may
// duplicate a loop, and with it a collective, for lane-dependent branches inside it.)
template <typename Resolve>
void warp_collective(Kind kind, unsigned mask, Resolve resolve) {
  Runtime& r = rt();
  Fiber& f = me();
  if (mask != 0xffffffffu) fail("only full-warp masks (0xffffffff) are emulated");
  Warp& w = r.warps[f.warp];
  for (int l = 0; l < kWarpSize; ++l) {
    if (r.fibers[f.warp * kWarpSize + l].state == State::done) {
      fail(std::string(kind_name(kind)) + " with lanes of the warp already returned");
    }
  }
  if (w.arrived == 0) {
    w.kind = kind;
  } else if (w.kind != kind) {
    fail(std::string("divergent warp: this lane is at ") + kind_name(kind) + ", other lanes at " + kind_name(w.kind));
  }
  f.state = State::at_warp;
  if (++w.arrived < kWarpSize) {
    yield();
    return;
  }
  w.arrived = 0;
  resolve(&r.fibers[f.warp * kWarpSize]);
  for (int l = 0; l < kWarpSize; ++l) r.fibers[f.warp * kWarpSize + l].state = State::ready;
}

uint16_t half_of(uint32_t reg, int hi) { return static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffffu); }

double operand(uint16_t bits, Mma type) {
  return type == Mma::f16 ? half_bits_to_float(bits) : bf16_bits_to_float(bits);
}

void run_block(Runtime& r, const dim3& block) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  r.fibers.assign(static_cast<size_t>(n), Fiber{});
  r.warps.assign(static_cast<size_t>((n + kWarpSize - 1) / kWarpSize), Warp{});
  for (int t = 0; t < n; ++t) {
    Fiber& f = r.fibers[static_cast<size_t>(t)];
    f.tid = t;
    f.warp = t / kWarpSize;
    f.lane = t % kWarpSize;
    f.idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    f.stack = stacks().get(static_cast<size_t>(t));
    make_context(f.ctx, f.stack, kStackBytes, fiber_main, &f);
  }
  r.alive = n;
  r.at_barrier = 0;
  std::memset(r.smem.data(), 0xff, r.smem_bytes);
  const int nwarps = static_cast<int>(r.warps.size());
  for (int phase = 0; r.alive > 0; ++phase) {
    bool ran = false;
    for (int k = 0; k < nwarps; ++k) {
      const int w = phase % 2 == 0 ? k : nwarps - 1 - k;
      // This warp runs until none of its lanes can: all wait at __syncthreads (or returned).
      for (int round = 0;; ++round) {
        bool any = false;
        for (int j = 0; j < kWarpSize; ++j) {
          const int t = w * kWarpSize + (round % 2 == 0 ? j : kWarpSize - 1 - j);
          if (t >= n) continue;
          Fiber& f = r.fibers[static_cast<size_t>(t)];
          if (f.state != State::ready) continue;
          any = ran = true;
          r.current = &f;
          threadIdx = f.idx;
#ifdef DIVATTN_EMU_USE_UCONTEXT
          g_entry_arg = &f;
#endif
          switch_context(r.scheduler, f.ctx);
          r.current = nullptr;
          if (!r.error.empty()) return;
        }
        if (!any) break;
      }
    }
    if (!ran) {
      int at_warp = 0;
      for (const Fiber& f : r.fibers) at_warp += f.state == State::at_warp;
      r.error = where(nullptr) + ": deadlock: " + std::to_string(r.at_barrier) + " threads wait at __syncthreads, " +
                std::to_string(at_warp) + " at a warp collective whose other lanes never come";
      return;
    }
  }
}

}  // namespace

// ------------------------------------------------------------------ device entry points

__attribute__((noinline)) void syncthreads() {
  Runtime& r = rt();
  Fiber& f = me();
  if (r.counting && r.at_barrier == 0) ++r.record.barriers;
  f.state = State::at_barrier;
  if (++r.at_barrier < r.alive) {
    yield();
    return;
  }
  r.at_barrier = 0;
  for (Fiber& g : r.fibers) {
    if (g.state == State::at_barrier) g.state = State::ready;
  }
}

__attribute__((noinline)) void syncwarp(unsigned mask) {
  warp_collective(Kind::syncwarp, mask, [](Fiber*) {});
}

__attribute__((noinline)) uint64_t shfl(unsigned mask, uint64_t bits, int lane_arg, int width, bool xor_mode) {
  Fiber& f = me();
  if (width != kWarpSize) fail("only width 32 shuffles are emulated");
  f.shfl_in = bits;
  f.shfl_arg = lane_arg;
  warp_collective(Kind::shfl, mask, [xor_mode](Fiber* lanes) {
    for (int l = 0; l < kWarpSize; ++l) {
      const int src = (xor_mode ? (l ^ lanes[l].shfl_arg) : lanes[l].shfl_arg) & (kWarpSize - 1);
      lanes[l].shfl_out = lanes[src].shfl_in;
    }
  });
  return f.shfl_out;
}

__attribute__((noinline)) void ldmatrix(uint32_t* out, const void* row, int count, bool trans) {
  Runtime& r = rt();
  Fiber& f = me();
  if (count != 4) fail("only ldmatrix .x4 is emulated (the kernels use no other)");
  if (f.lane < 8 * count) {
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
    if (!in_smem(row, 16)) fail("ldmatrix row address outside shared memory");
  }
  f.row = row;
  warp_collective(Kind::ldmatrix, 0xffffffffu, [&r, count, trans](Fiber* lanes) {
    for (int m = 0; m < count; ++m) {
      // row j of matrix m comes from lane 8m + j; element (i, k) is its k-th b16
      uint16_t el[8][8];
      int per_bank_group[8] = {0};
      for (int j = 0; j < 8; ++j) {
        std::memcpy(el[j], lanes[8 * m + j].row, 16);
        ++per_bank_group[(reinterpret_cast<uintptr_t>(lanes[8 * m + j].row) / 16) % 8];
      }
      if (r.counting) {
        ++r.record.ldmatrix;
        r.record.ldmatrix_wavefronts += static_cast<uint64_t>(*std::max_element(per_bank_group, per_bank_group + 8));
      }
      for (int l = 0; l < kWarpSize; ++l) {
        const int i = l / 4, k = 2 * (l % 4);
        const uint16_t lo = trans ? el[k][i] : el[i][k];
        const uint16_t hi = trans ? el[k + 1][i] : el[i][k + 1];
        lanes[l].r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
    }
  });
  std::memcpy(out, f.r, sizeof(uint32_t) * static_cast<size_t>(count));
}

__attribute__((noinline)) void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c, Mma type) {
  Runtime& r = rt();
  Fiber& f = me();
  std::memcpy(f.a, a, sizeof f.a);
  std::memcpy(f.b, b, sizeof f.b);
  std::memcpy(f.c, c, sizeof f.c);
  warp_collective(Kind::mma, 0xffffffffu, [&r, type](Fiber* lanes) {
    // The fragment layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating
    // point type"): groupID = lane >> 2, threadID_in_group = lane % 4.
    double A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < kWarpSize; ++l) {
      const int g = l >> 2, t = l % 4;
      for (int i = 0; i < 8; ++i) {  // a0..a7: two per register, low half first
        const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
        const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
        A[row][col] = operand(half_of(lanes[l].a[i / 2], i & 1), type);
      }
      for (int i = 0; i < 4; ++i) {  // b0..b3
        const int row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
        B[row][g] = operand(half_of(lanes[l].b[i / 2], i & 1), type);
      }
      for (int i = 0; i < 4; ++i) {  // c0..c3
        C[i < 2 ? g : g + 8][t * 2 + (i & 1)] = lanes[l].c[i];
      }
    }
    for (int l = 0; l < kWarpSize; ++l) {
      const int g = l >> 2, t = l % 4;
      for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
        double acc = C[row][col];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        lanes[l].d[i] = static_cast<float>(acc);
      }
    }
    if (r.counting) ++r.record.mma;
  });
  std::memcpy(d, f.d, sizeof f.d);
}

__attribute__((noinline)) void cp_async(void* dst, const void* src, int cp_size, int src_size) {
  Runtime& r = rt();
  Fiber& f = me();
  if (cp_size != 4 && cp_size != 8 && cp_size != 16) fail("cp.async copies 4, 8 or 16 bytes");
  if (src_size < 0 || src_size > cp_size) fail("cp.async src-size must be in [0, cp-size]");
  if (reinterpret_cast<uintptr_t>(dst) % static_cast<uintptr_t>(cp_size) != 0 ||
      (src_size > 0 && reinterpret_cast<uintptr_t>(src) % static_cast<uintptr_t>(cp_size) != 0)) {
    fail("cp.async addresses must be aligned to the copy size");
  }
  if (!in_smem(dst, static_cast<size_t>(cp_size))) fail("cp.async destination outside shared memory");
  if (src_size > 0) {
    check_global(src, static_cast<size_t>(src_size), false);
    if (r.counting) record_sectors(r.block_loads, src, static_cast<size_t>(src_size));
  }
  if (r.counting) ++r.record.cp_async;
  std::memset(dst, 0xff, static_cast<size_t>(cp_size));  // undefined until the group is waited for
  f.open.push_back({static_cast<char*>(dst), static_cast<const char*>(src), cp_size, src_size});
}

__attribute__((noinline)) void cp_async_commit() {
  Fiber& f = me();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

__attribute__((noinline)) void cp_async_wait(int n) {
  Fiber& f = me();
  while (static_cast<int>(f.groups.size()) > n) {
    for (const Copy& c : f.groups.front()) {
      std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_size));
      std::memset(c.dst + c.src_size, 0, static_cast<size_t>(c.cp_size - c.src_size));
    }
    f.groups.pop_front();
  }
}

void* dynamic_smem() { return rt().smem.data(); }

void global_read(const void* p, size_t bytes) {
  Runtime& r = rt();
  check_global(p, bytes, false);
  if (r.counting) record_sectors(r.block_loads, p, bytes);
}

void global_write(const void* p, size_t bytes) {
  Runtime& r = rt();
  check_global(p, bytes, true);
  if (r.counting) record_sectors(r.block_stores, p, bytes);
}

// ------------------------------------------------------------------ launches

cudaError_t run_grid(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem, Body body) {
  Runtime& r = rt();
  auto refuse = [&](cudaError_t err, const std::string& why) {
    r.last_error = err;
    r.last_message = std::string(name) + ": " + why;
    return err;
  };
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024 || threads % kWarpSize != 0) {
    return refuse(cudaErrorInvalidConfiguration, "a block of " + std::to_string(threads) +
                                                     " threads (the emulator takes whole warps, at most 1024)");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    return refuse(cudaErrorInvalidConfiguration, "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                                                     ", " + std::to_string(grid.z) + ") is out of CUDA's limits");
  }
  const auto it = r.max_dynamic_smem.find(kernel);
  const size_t allowed = it == r.max_dynamic_smem.end() ? kDefaultDynamicSmem : static_cast<size_t>(it->second);
  if (smem > allowed) {
    return refuse(cudaErrorInvalidValue, std::to_string(smem) + " bytes of dynamic shared memory, more than the " +
                                             std::to_string(allowed) + " allowed (cudaFuncSetAttribute)");
  }
  if (r.smem.size() < smem) r.smem.resize(smem);
  r.smem_bytes = smem;
  r.name = name;
  r.body = body;
  r.error.clear();
  gridDim = grid;
  blockDim = block;
  if (r.counting) {
    r.record = LaunchRecord{};
    r.record.name = name;
    r.record.grid = grid;
    r.record.block = block;
    r.record.smem = smem;
    r.launch_loads.clear();
    r.launch_stores.clear();
  }
  for (unsigned z = 0; z < grid.z && r.error.empty(); ++z) {
    for (unsigned y = 0; y < grid.y && r.error.empty(); ++y) {
      for (unsigned x = 0; x < grid.x && r.error.empty(); ++x) {
        blockIdx = {x, y, z};
        r.block_loads.clear();
        r.block_stores.clear();
        run_block(r, block);
        if (r.counting) {
          r.block_loads.resize(unique_count(r.block_loads));
          r.block_stores.resize(unique_count(r.block_stores));
          r.record.blocks += 1;
          r.record.load_sectors += r.block_loads.size();
          r.record.store_sectors += r.block_stores.size();
          r.launch_loads.insert(r.launch_loads.end(), r.block_loads.begin(), r.block_loads.end());
          r.launch_stores.insert(r.launch_stores.end(), r.block_stores.begin(), r.block_stores.end());
        }
      }
    }
  }
  r.fibers.clear();
  if (!r.error.empty()) return refuse(cudaErrorLaunchFailure, r.error.substr(std::strlen(name) + 1));
  if (r.counting) {
    r.record.unique_load_sectors = unique_count(r.launch_loads);
    r.record.unique_store_sectors = unique_count(r.launch_stores);
    r.records.push_back(r.record);
  }
  r.last_error = cudaSuccess;
  return cudaSuccess;
}

}  // namespace emu

// ------------------------------------------------------------------ the runtime API

const char* cudaGetErrorString(cudaError_t err) {
  emu::Runtime& r = emu::rt();
  if (err != cudaSuccess && err == r.last_error && !r.last_message.empty()) return r.last_message.c_str();
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unspecified launch failure";
  }
}

cudaError_t cudaGetLastError() {
  emu::Runtime& r = emu::rt();
  const cudaError_t err = r.last_error;
  r.last_error = cudaSuccess;
  return err;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  emu::Runtime& r = emu::rt();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > emu::kMaxDynamicSmem) {
    r.last_error = cudaErrorInvalidValue;
    r.last_message = "cudaFuncSetAttribute: " + std::to_string(value) + " bytes of dynamic shared memory, more than " +
                     std::to_string(emu::kMaxDynamicSmem) + " (sm_80)";
    return cudaErrorInvalidValue;
  }
  r.max_dynamic_smem[func] = value;
  return cudaSuccess;
}

// ------------------------------------------------------------------ control from Python (ctypes)

extern "C" {

__attribute__((visibility("default"))) void divattn_emu_clear_ranges() { emu::rt().ranges.clear(); }

__attribute__((visibility("default"))) void divattn_emu_add_range(const void* begin, size_t bytes, int writable) {
  const uintptr_t b = reinterpret_cast<uintptr_t>(begin);
  emu::rt().ranges.push_back({b, b + bytes, writable != 0});
}

__attribute__((visibility("default"))) void divattn_emu_counting(int on) {
  emu::Runtime& r = emu::rt();
  r.counting = on != 0;
  r.records.clear();
}

// The launches recorded since counting was switched on (or since the last call), as JSON.
__attribute__((visibility("default"))) const char* divattn_emu_records() {
  emu::Runtime& r = emu::rt();
  std::string out = "[";
  for (size_t i = 0; i < r.records.size(); ++i) {
    const emu::LaunchRecord& x = r.records[i];
    char buf[768];
    std::snprintf(buf, sizeof buf,
                  "%s{\"kernel\": \"%s\", \"grid\": [%u, %u, %u], \"block\": [%u, %u, %u], \"smem\": %zu, "
                  "\"blocks\": %" PRIu64 ", \"load_sectors\": %" PRIu64 ", \"store_sectors\": %" PRIu64
                  ", \"unique_load_sectors\": %" PRIu64 ", \"unique_store_sectors\": %" PRIu64
                  ", \"ldmatrix\": %" PRIu64 ", \"ldmatrix_wavefronts\": %" PRIu64 ", \"mma\": %" PRIu64
                  ", \"cp_async\": %" PRIu64 ", \"barriers\": %" PRIu64 "}",
                  i ? ", " : "", x.name.c_str(), x.grid.x, x.grid.y, x.grid.z, x.block.x, x.block.y, x.block.z, x.smem,
                  x.blocks, x.load_sectors, x.store_sectors, x.unique_load_sectors, x.unique_store_sectors,
                  x.ldmatrix, x.ldmatrix_wavefronts, x.mma, x.cp_async, x.barriers);
    out += buf;
  }
  out += "]";
  r.records.clear();
  r.records_json = out;
  return r.records_json.c_str();
}

__attribute__((visibility("default"))) const char* divattn_emu_context_switch() {
#ifdef DIVATTN_EMU_USE_UCONTEXT
  return "ucontext";
#else
  return "x86-64 assembly";
#endif
}

}  // extern "C"
