#!/usr/bin/env bash
# Build the MogeGating Ascend C custom operator package on a CANN host, with MindSpore's bundled offline compiler
# (mindspore/lib/plugin/ascend/custom_compiler, "python setup.py -o op_host -k op_kernel ..."; MindSpore tutorial
# "AOT-Type Custom Operators (Ascend)", docs tutorials/source_en/custom_program/operation/op_custom_ascendc.md).
# custom_compiler copies CANN's Ascend C project template, drops op_host/*.cpp|*.h and op_kernel/*.cpp|*.h into it
# and runs the template's build.sh, which produces build_out/*.run and a vendors/<name> tree.
#
# Environment:
#   ASCEND_HOME_PATH   CANN toolkit root (set by "source <ascend-toolkit>/set_env.sh"); required
#   PYTHON             interpreter with MindSpore >= 2.3 installed (default python3)
#   VENDOR_NAME        vendor directory name (default mindpangu)
#   SOC_VERSION        target SoC for setup.py --soc_version (default ascend910b)
#   BUILD_DIR          scratch directory (default ./build next to this script)
# custom_compiler rejects paths containing characters other than [A-Za-z0-9_./-] and symbolic links.
set -euo pipefail

die() { echo "build.sh: error: $*" >&2; exit 2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
CANN="${ASCEND_HOME_PATH:-}"
[[ -n "$CANN" ]] || die "ASCEND_HOME_PATH is not set: no CANN toolkit found. This operator needs a CANN host \
(Ascend 910B); source <ascend-toolkit>/set_env.sh first (e.g. /usr/local/Ascend/ascend-toolkit/set_env.sh)."
[[ -d "$CANN" ]] || die "ASCEND_HOME_PATH=$CANN is not a directory: the CANN toolkit is not installed there."

PYTHON="${PYTHON:-python3}"
VENDOR="${VENDOR_NAME:-mindpangu}"
SOC="${SOC_VERSION:-ascend910b}"
BUILD="${BUILD_DIR:-$HERE/build}"

MS_DIR="$("$PYTHON" -c 'import os, mindspore; print(os.path.dirname(mindspore.__file__))' 2>/dev/null)" \
  || die "$PYTHON cannot import mindspore; install MindSpore (>= 2.3) for its custom_compiler."
COMPILER="$MS_DIR/lib/plugin/ascend/custom_compiler"
[[ -f "$COMPILER/setup.py" ]] || die "no custom_compiler in $MS_DIR/lib/plugin/ascend (MindSpore too old?)."

rm -rf "$BUILD"
mkdir -p "$BUILD"
cp -r "$COMPILER" "$BUILD/custom_compiler"
cd "$BUILD/custom_compiler"

args=(-o "$HERE/op_host" -k "$HERE/op_kernel" --vendor_name "$VENDOR" --ascend_cann_package_path "$CANN")
if grep -q -- "--soc_version" setup.py; then  # option added after MindSpore 2.3
  args+=(--soc_version "$SOC")
fi
echo "build.sh: $PYTHON setup.py ${args[*]}"
"$PYTHON" setup.py "${args[@]}" || die "custom_compiler failed; see $BUILD/custom_compiler/build.log"

OUT="$BUILD/custom_compiler/CustomProject/build_out"
VENDOR_DIR="$(find "$OUT" -type d -path "*/vendors/$VENDOR" -print -quit 2>/dev/null || true)"
echo "build.sh: package(s): $(ls "$OUT"/*.run 2>/dev/null | tr '\n' ' ')"
if [[ -n "$VENDOR_DIR" ]]; then
  echo "build.sh: to use without installing the .run package:"
  echo "  export ASCEND_CUSTOM_OPP_PATH=$VENDOR_DIR:\${ASCEND_CUSTOM_OPP_PATH:-}"
fi
