#!/usr/bin/env bash
# Builds KenLM's estimator and binarizer (lmplz, build_binary) from the source of the pinned
# `kenlm` release on PyPI and installs them into PREFIX/bin (`make setup` uses the venv).
#
#   tools/build_kenlm.sh .venv
#
# Needs cmake, g++ and Boost (program_options, system, thread, test) with zlib, bzip2 and
# lzma headers. As root with apt-get, missing Debian packages are installed; otherwise the
# script names them and stops. The build happens in build/kenlm and the binaries are moved
# into place only once both built, so a killed build leaves nothing half-installed.
set -euo pipefail

PREFIX=${1:?usage: tools/build_kenlm.sh PREFIX}
KENLM_VERSION=0.2.0
KENLM_SHA256=c2dc1dc09d3c150e6a1777ef0fd5cac3688e1dc1cc13e41472d0284e5e88ac7f
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK="$HERE/build/kenlm"
PACKAGES="cmake g++ libboost-program-options-dev libboost-system-dev libboost-thread-dev
libboost-test-dev zlib1g-dev libbz2-dev liblzma-dev"

if [ -x "$PREFIX/bin/lmplz" ] && [ -x "$PREFIX/bin/build_binary" ]; then
    exit 0
fi

missing=()
for header in boost/program_options.hpp boost/thread.hpp boost/test/unit_test.hpp \
    zlib.h bzlib.h lzma.h; do
    [ -e "/usr/include/$header" ] || missing+=("$header")
done
command -v cmake >/dev/null || missing+=(cmake)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "build_kenlm: installing Debian packages for KenLM (missing: ${missing[*]})"
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $PACKAGES \
            >/dev/null || {
            apt-get update -q >/dev/null
            # shellcheck disable=SC2086
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                $PACKAGES >/dev/null
        }
    else
        echo "build_kenlm: missing ${missing[*]}; install these packages and run again:" >&2
        echo "  apt-get install $PACKAGES" | tr '\n' ' ' >&2
        echo >&2
        exit 1
    fi
fi

mkdir -p "$WORK"
SDIST="$WORK/kenlm-$KENLM_VERSION.tar.gz"
if [ ! -f "$SDIST" ] || ! echo "$KENLM_SHA256  $SDIST" | sha256sum --check --status; then
    rm -f "$SDIST"
    "$PREFIX/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
        --no-binary kenlm --no-build-isolation "kenlm==$KENLM_VERSION" -d "$WORK"
    echo "$KENLM_SHA256  $SDIST" | sha256sum --check --status || {
        echo "build_kenlm: $SDIST does not have the expected sha256" >&2
        exit 1
    }
fi
rm -rf "$WORK/src" "$WORK/cmake-build"
mkdir -p "$WORK/src"
tar -xzf "$SDIST" -C "$WORK/src" --strip-components 1
# KenLM's CMakeLists asks for CMake 2.8 compatibility, which CMake 4 refuses without this.
cmake -S "$WORK/src" -B "$WORK/cmake-build" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_POLICY_VERSION_MINIMUM=3.5 -DKENLM_MAX_ORDER=6 >"$WORK/cmake.log" 2>&1 || {
    tail -20 "$WORK/cmake.log" >&2
    exit 1
}
cmake --build "$WORK/cmake-build" --target lmplz build_binary -j "$(nproc)" \
    >"$WORK/build.log" 2>&1 || {
    tail -20 "$WORK/build.log" >&2
    exit 1
}
mkdir -p "$PREFIX/bin"
for tool in lmplz build_binary; do
    install -m 755 "$WORK/cmake-build/bin/$tool" "$PREFIX/bin/.$tool.tmp"
    mv -f "$PREFIX/bin/.$tool.tmp" "$PREFIX/bin/$tool"
done
echo "build_kenlm: installed lmplz and build_binary (KenLM $KENLM_VERSION) into $PREFIX/bin"
