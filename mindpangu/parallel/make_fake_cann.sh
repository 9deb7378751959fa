#!/usr/bin/env bash
# Compile-only stub CANN libraries generated from the installed MindSpore wheel, so that its Ascend plugin loads on
# a CPU host and MS_SIMULATION_LEVEL=0 (DryRun) compiles real semi-auto-parallel graphs. Never used to execute.
# make_fake_cann.sh <python-with-mindspore> <out_dir>; then
#   export LD_LIBRARY_PATH=<out_dir>/latest/lib64 PYTHONPATH=<out_dir>/py:$PYTHONPATH ASCEND_OPP_PATH=<out_dir>/latest/opp
# (ASCEND_OPP_PATH and latest/include/acl/acl_base.h: ops.Custom for an Ascend C op compiles a small launcher against
# CANN's acl_base.h, which it finds as <ASCEND_OPP_PATH up to "opp">/include.)
set -euo pipefail
PY=${1:?python}; OUT=${2:?out_dir}
MSLIB=$($PY -c "import os,importlib.util;print(os.path.join(os.path.dirname(importlib.util.find_spec('mindspore').origin),'lib'))")
SITE=$(dirname "$(dirname "$MSLIB")")
W=$(mktemp -d); mkdir -p "$OUT/latest/lib64" "$OUT/py/hccl" "$OUT/latest/include/acl" "$OUT/latest/opp"
printf '/* compile-only stub of CANN acl/acl_base.h */\n#include <stddef.h>\n#include <stdint.h>\n' > "$OUT/latest/include/acl/acl_base.h"
find "$MSLIB" -name "*.so*" -type f > "$W/libs"
( cat "$W/libs"; ls /lib/x86_64-linux-gnu/*.so* /usr/lib/x86_64-linux-gnu/*.so* "$SITE"/*/*.so "$SITE"/*.libs/*.so* 2>/dev/null ) \
  | while read -r f; do { nm -D --defined-only "$f" 2>/dev/null || true; } | awk '{print $3}'; done | sed 's/@.*//' | sort -u > "$W/defined"
while read -r f; do { readelf --dyn-syms -W "$f" 2>/dev/null || true; } | awk '$7=="UND" && $5!="WEAK" {print $4, $8}'; done < "$W/libs" | sed 's/@.*//' | sort -u > "$W/und"
awk '$1=="OBJECT"{print $2}' "$W/und" | sort -u > "$W/obj"
for f in "$MSLIB"/plugin/*.so* "$MSLIB"/plugin/ascend/*.so; do strings "$f"; done \
  | grep -E '^aclnn[A-Za-z0-9_]+$|^acl[a-z]*[A-Z][A-Za-z0-9_]+$|^Hccl[A-Za-z0-9_]+$|^rt[A-Z][A-Za-z0-9_]+$|^atb[A-Z][A-Za-z0-9_]+$' | sort -u > "$W/dl"
( awk '{print $2}' "$W/und"; cat "$W/dl" ) | sort -u | comm -23 - "$W/defined" \
  | grep -v -E '^(Py|_Py|__gcov|__gmon|_ITM)|^$|^__stack_chk_guard$' > "$W/missing"
cat > "$W/special.cc" <<'CC'
#include <map>
#include <string>
#include <cstdint>
namespace ge { class StatusFactory { public: static StatusFactory *Instance(); std::map<uint32_t, std::string> err_desc_; };
StatusFactory *StatusFactory::Instance() { static StatusFactory f; return &f; } }
CC
g++ -c -fPIC -O1 -D_GLIBCXX_USE_CXX11_ABI=0 "$W/special.cc" -o "$W/special.o"
SPECIAL=$(nm "$W/special.o" | awk '$2=="T"{print $3}')
grep -E '^acl(op|mdl|tdt)?Create|^aclCreate' "$W/missing" | grep -v '^aclrt' > "$W/ptr" || true
{ echo ".text"
  grep -v -x -F -f "$W/obj" "$W/missing" | grep -v -x -F -e "$SPECIAL" | grep -v -x -F -f "$W/ptr" | grep -v -x aclrtGetSocName \
    | while read -r s; do printf '.globl %s\n.type %s,@function\n%s:\n  xorl %%eax,%%eax\n  ret\n' "$s" "$s" "$s"; done
  while read -r s; do printf '.globl %s\n.type %s,@function\n%s:\n  leaq fake_obj(%%rip),%%rax\n  ret\n' "$s" "$s" "$s"; done < "$W/ptr"
  printf '.globl aclrtGetSocName\n.type aclrtGetSocName,@function\naclrtGetSocName:\n  leaq soc_name(%%rip),%%rax\n  ret\n'
  printf '.data\nsoc_name: .asciz "Ascend910B1"\n.balign 64\nfake_obj: .zero 65536\n'
  grep -x -F -f "$W/obj" "$W/missing" | while read -r s; do printf '.globl %s\n.type %s,@object\n.size %s,256\n%s:\n  .zero 256\n' "$s" "$s" "$s" "$s"; done
  echo '.section .note.GNU-stack,"",@progbits'; } > "$W/stubs.s"
gcc -c "$W/stubs.s" -o "$W/stubs.o"
for so in libacl_op_compiler.so libacl_tdt_channel.so libacl_tdt_queue.so libacl_dvpp.so libacl_dvpp_mpi.so libacl_dvpp_op.so \
          libascend_hal.so libascendalog.so libascendcl.so libatb.so libc_sec.so libexe_graph.so libge_runner.so libgraph.so \
          libhccl.so libmmpa.so libmsprofiler.so libnnopbase.so libopapi.so libplatform.so libprofapi.so libregister.so libruntime.so; do
  g++ -shared -o "$OUT/latest/lib64/$so" -Wl,-soname,$so "$W/stubs.o" "$W/special.o"
done
: > "$OUT/py/hccl/__init__.py"; echo '__sys_version__ = "8.3.0"' > "$OUT/py/hccl/sys_version.py"
echo "stubbed $(wc -l < "$W/missing") symbols into $OUT/latest/lib64"; rm -rf "$W"
