#!/usr/bin/env bash
# Compile every divattn/csrc/ source against the installed torch's headers: .cu files with nvcc
# for sm_80 and sm_90, .cpp files with the host compiler, to object files in a temporary
# directory. Nothing is linked or run (CI has no GPU and a CPU build of torch); a
# compile error in any source fails this script. The .cu files compile with
# -Xptxas -v: a table of every kernel per architecture follows (registers, spill
# stores/loads, stack frame, static shared memory) with, from `cuobjdump -sass` of the
# objects, its tensor-core instructions (HMMA), ldmatrix loads (LDSM) and cp.async copies
# (LDGSTS). A kernel that spills registers on any architecture, in any dtype, fails the
# script, as does one whose resources ptxas did not report, and an fp16 / bf16 attention
# kernel (attn_*<__half / __nv_bfloat16, ...>) without HMMA or LDSM.
#
# Env: NVCC (compiler to use), CUOBJDUMP (default: next to nvcc, else the one in the
# triton wheel), DIVATTN_CUDA_ARCHS (default "80;90"), MAX_JOBS
# (parallel compiles, default: CPU count), CXX (host compiler, default c++),
# DIVATTN_ALLOW_SPILLS=1 (report spills without failing, for experiments).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

find_nvcc() {
  if [ -n "${NVCC:-}" ]; then echo "$NVCC"; return; fi
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then echo "$CUDA_HOME/bin/nvcc"; return; fi
  if [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda/bin/nvcc; return; fi
  local newest
  newest=$(ls -d /usr/local/cuda-*/bin/nvcc 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$newest" ]; then echo "$newest"; return; fi
  command -v nvcc || true
}
nvcc=$(find_nvcc)
if [ -z "$nvcc" ]; then
  echo "compile_csrc: nvcc not found (set NVCC or CUDA_HOME)" >&2
  exit 1
fi
# The toolkit root, for the host compiler's CUDA include path (nvcc may be a wrapper script).
cuda_root=$("$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
cuda_root=${cuda_root:-$(dirname "$(dirname "$nvcc")")}

# Include paths and flags exactly as torch.utils.cpp_extension would use them.
mapfile -t torch_cfg < <(python - <<'EOF'
import inspect
import os
import sysconfig

import torch
from torch.utils import cpp_extension as ce

inc = ce.include_paths() + [sysconfig.get_paths()["include"]]
print(" ".join("-I" + p for p in inc))
defs = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
# A CPU build of torch ships c10/cuda headers but not the one its CMake generates for CUDA
# builds (it only sets the Windows DLL export macro); tell CUDAMacros.h to skip it.
generated = os.path.join(ce.include_paths()[0], "c10", "cuda", "impl", "cuda_cmake_macros.h")
if not os.path.exists(generated):
    defs.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
print(" ".join(defs))
print(" ".join(ce.COMMON_NVCC_FLAGS))
# The C++ standard torch builds extensions with (C++20 for recent torch, C++17 for older).
print("c++20" if "-std=c++20" in inspect.getsource(ce) else "c++17")
print(torch.__version__)
print("yes" if not os.path.exists(generated) else "no")
EOF
)
includes=${torch_cfg[0]}
defines=${torch_cfg[1]}
nvcc_common=${torch_cfg[2]}
std=${torch_cfg[3]}
torch_version=${torch_cfg[4]}
no_cmake_macros=${torch_cfg[5]}

archs=${DIVATTN_CUDA_ARCHS:-"80;90"}
gencode=""
arch_names=""
for a in ${archs//[;, ]/ }; do
  a=${a//./}
  gencode+=" -gencode=arch=compute_${a},code=sm_${a}"
  arch_names+="${arch_names:+,}sm_${a}"
done
jobs=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}
cxx=${CXX:-c++}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "compile_csrc: $("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/nvcc \1/p') ($nvcc), $($cxx --version | head -n 1)"
echo "compile_csrc: torch $torch_version headers, -std=$std, archs $arch_names, $jobs parallel jobs"
if [ "$no_cmake_macros" = yes ]; then
  echo "compile_csrc: this torch has no c10/cuda/impl/cuda_cmake_macros.h (CPU build): compiling with -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"
fi

cuobjdump=${CUOBJDUMP:-$(dirname "$nvcc")/cuobjdump}
if [ ! -x "$cuobjdump" ]; then
  cuobjdump=$(python -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))' 2>/dev/null || true)
fi
if [ ! -x "$cuobjdump" ]; then
  echo "compile_csrc: cuobjdump not found (set CUOBJDUMP; the triton wheel ships one)" >&2
  exit 1
fi
export CUOBJDUMP=$cuobjdump
export nvcc cuda_root includes defines nvcc_common std gencode arch_names cxx out
compile_one() {
  local src=$1 obj t0 log
  obj="$out/$(basename "$src").o"
  log="$obj.log"
  t0=$(date +%s)
  case "$src" in
    *.cu)
      # shellcheck disable=SC2086
      if ! "$nvcc" -c "$src" -o "$obj" -std="$std" -O3 --use_fast_math -lineinfo -Xcompiler -fPIC -Xptxas -v \
        $nvcc_common $gencode $defines $includes >"$log" 2>&1; then
        cat "$log" >&2; echo "compile_csrc: FAILED $src" >&2; return 1
      fi
      echo "compile_csrc: compiled $src for $arch_names in $(( $(date +%s) - t0 )) s" ;;
    *.cpp)
      # shellcheck disable=SC2086
      if ! "$cxx" -c "$src" -o "$obj" -std="$std" -O3 -fPIC -Wall -Wno-unknown-pragmas \
        -DDIVATTN_ARCHS=ci $defines $includes -I"$cuda_root/include" >"$log" 2>&1; then
        cat "$log" >&2; echo "compile_csrc: FAILED $src" >&2; return 1
      fi
      echo "compile_csrc: compiled $src with $cxx in $(( $(date +%s) - t0 )) s" ;;
  esac
  if grep -q -i "warning" "$log"; then
    grep -i -A3 "warning" "$log" | head -n 40
  fi
}
export -f compile_one

mapfile -t sources < <(ls divattn/csrc/*.cu divattn/csrc/*.cpp 2>/dev/null | sort)
if [ "${#sources[@]}" -eq 0 ]; then
  echo "compile_csrc: no sources in divattn/csrc/" >&2
  exit 1
fi
# The C++ binding first: it is the slowest compile (the full torch/extension.h).
printf '%s\n' "${sources[@]}" | sort -t. -k2,2 | xargs -P "$jobs" -I{} bash -c 'compile_one "$@"' _ {}
echo "compile_csrc: ${#sources[@]} sources compiled without errors in $(( $(date +%s) - start )) s (objects only: nothing linked or run)"

# The resources ptxas reported for each kernel (-Xptxas -v), demangled when c++filt is there.
python - "$out"/*.cu.o.log <<'PY'
import os
import re
import shutil
import subprocess
import sys

rows = []  # [source, mangled name, arch, registers, spill stores, spill loads, stack, smem]
for log in sys.argv[1:]:
    source = log.rsplit("/", 1)[-1][: -len(".o.log")]
    current = None
    for line in open(log, encoding="utf-8", errors="replace"):
        m = re.search(r"Compiling entry function '([^']+)' for '(\w+)'", line)
        if m:
            current = [source, m.group(1), m.group(2), None, None, None, None, 0]
            rows.append(current)
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m and (current is None or current[1] != m.group(1)):
            current = None  # a non-inlined device function, not a kernel
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            current[6], current[4], current[5] = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current[3] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current[7] = int(smem.group(1)) if smem else 0
if not rows:
    print("compile_csrc: ptxas reported no kernels", file=sys.stderr)
    sys.exit(1)
names = {r[1]: r[1] for r in rows}
if shutil.which("c++filt"):
    mangled = list(names)
    plain = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True).stdout.splitlines()
    if len(plain) == len(mangled):
        names = dict(zip(mangled, plain))


def short(name):
    """The demangled name without namespaces or parameter list (template arguments kept)."""
    name = names[name].replace("(anonymous namespace)::", "")
    name = re.sub(r"^void ", "", name).removeprefix("divattn::")
    depth = 0
    for i, ch in enumerate(name):
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            return name[:i]
    return name


# Instruction counts per (kernel, arch) from the SASS of each object.
OPS = ("HMMA", "LDSM", "LDGSTS")
sass = {}
for log in sys.argv[1:]:
    text = subprocess.run([os.environ["CUOBJDUMP"], "-sass", log[: -len(".log")]], capture_output=True, text=True,
                          check=True).stdout
    arch = fn = None
    for line in text.splitlines():
        m = re.search(r"code for (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"Function : (\S+)", line)
        if m:
            fn = m.group(1)
            sass[(fn, arch)] = dict.fromkeys(OPS, 0)
            continue
        m = re.search(r"\b(HMMA|LDSM|LDGSTS)\b", line)
        if m and fn is not None:
            sass[(fn, arch)][m.group(1)] += 1

header = ["kernel", "source", "arch", "regs", "spill st B", "spill ld B", "stack B", "smem B", *OPS]
table = sorted([short(r[1]), r[0], r[2], *("?" if v is None else str(v) for v in r[3:]),
                *(str(sass[(r[1], r[2])][op]) if (r[1], r[2]) in sass else "?" for op in OPS)] for r in rows)
widths = [max(len(t[i]) for t in table + [header]) for i in range(len(header))]
fmt = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))
print("compile_csrc: ptxas resources (-Xptxas -v) and SASS instruction counts (cuobjdump -sass) per kernel")
print(fmt.format(*header))
for t in table:
    print(fmt.format(*t))
unreported = [t for t in table if "?" in t[3:7]]
if unreported:
    print("compile_csrc: ptxas reported no registers or spills for:", file=sys.stderr)
    for t in unreported:
        print(f"  {t[0]} [{t[2]}]", file=sys.stderr)
    sys.exit(1)
half = [t for t in table if t[0].startswith("attn_") and re.search(r"<(__half|__nv_bfloat16)\b", t[0])]
no_tensor_cores = [t for t in half if t[8] in ("0", "?") or t[9] in ("0", "?")]
if not half or no_tensor_cores:
    print("compile_csrc: fp16 / bf16 attention kernels without tensor-core instructions (HMMA) fed by ldmatrix (LDSM):"
          if half else "compile_csrc: no fp16 / bf16 attention kernel found", file=sys.stderr)
    for t in no_tensor_cores:
        print(f"  {t[0]} [{t[2]}]: {t[8]} HMMA, {t[9]} LDSM", file=sys.stderr)
    sys.exit(1)
print(f"compile_csrc: every fp16 / bf16 attention kernel runs on tensor cores ({len(half)} builds, "
      f"{min(int(t[8]) for t in half)} to {max(int(t[8]) for t in half)} HMMA and "
      f"{min(int(t[9]) for t in half)} to {max(int(t[9]) for t in half)} LDSM each)")
spilling = [t for t in table if t[4] != "0" or t[5] != "0"]
if spilling:
    kernels = len({t[0] for t in spilling})
    allowed = os.environ.get("DIVATTN_ALLOW_SPILLS") == "1"
    out = sys.stdout if allowed else sys.stderr
    print(f"compile_csrc: {kernels} of {len({t[0] for t in table})} kernels spill registers"
          f"{' (DIVATTN_ALLOW_SPILLS=1: reported, not failed)' if allowed else ''}:", file=out)
    for t in spilling:
        print(f"  {t[0]} [{t[2]}]: {t[4]} B spill stores, {t[5]} B spill loads, {t[6]} B stack frame", file=out)
    sys.exit(0 if allowed else 1)
print(f"compile_csrc: no kernel spills registers ({len(table)} kernel builds)")
PY
