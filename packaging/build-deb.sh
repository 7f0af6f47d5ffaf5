#!/usr/bin/env bash
# Builds flowgate's Debian package, reproducibly: two runs on one commit give byte-identical
# .debs. Installs cargo-deb (a pinned version) if it is missing, builds the release binaries,
# generates the man pages and shell completions from the command line's definition
# (flowgate-gen), and writes target/debian/flowgate_VERSION-1_ARCH.deb.
#
#   packaging/build-deb.sh                 # release build, the package to ship
#   packaging/build-deb.sh --dev           # the debug binary instead (quicker; what the tests use)
#   packaging/build-deb.sh --no-build      # package the binaries already built
#   packaging/build-deb.sh --output DIR    # write the .deb into DIR instead of target/debian
#   packaging/build-deb.sh --tools-only    # only install cargo-deb (scripts/test.sh does this)
#
# Every file in the package gets the time of the last commit (SOURCE_DATE_EPOCH, unless set
# already: a build from a tarball without git must set it). Needs dpkg-dev (dpkg-shlibdeps
# works out the library dependencies) and binutils (strip).
set -euo pipefail
cd "$(dirname "$0")/.."

# The cargo-deb this script was checked with; another version may lay the package out
# differently, so it is installed even when some other version is on the PATH.
CARGO_DEB_VERSION=3.8.0

profile=release
build=1
tools_only=0
output=""
while (($#)); do
    case "$1" in
        --dev) profile=dev ;;
        --no-build) build=0 ;;
        --tools-only) tools_only=1 ;;
        --output)
            output="${2:?--output needs a directory}"
            shift
            ;;
        *)
            echo "build-deb.sh: unknown argument $1 (see the comment at the top)" >&2
            exit 2
            ;;
    esac
    shift
done

if [[ $(cargo deb --version 2>/dev/null) != *" $CARGO_DEB_VERSION"* ]]; then
    echo "== installing cargo-deb $CARGO_DEB_VERSION"
    cargo install --locked --quiet cargo-deb --version "$CARGO_DEB_VERSION"
fi
if ((tools_only)); then exit 0; fi

if [[ -z ${SOURCE_DATE_EPOCH:-} ]]; then
    if ! SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null); then
        echo "build-deb.sh: not a git checkout: set SOURCE_DATE_EPOCH (seconds since 1970) for the files' times" >&2
        exit 1
    fi
fi
export SOURCE_DATE_EPOCH

target_dir=${CARGO_TARGET_DIR:-target}
case $profile in
    release) out_dir="$target_dir/release" ;;
    dev) out_dir="$target_dir/debug" ;;
esac

if ((build)); then
    echo "== cargo build --profile $profile (flowgate, flowgate-gen)"
    cargo build --locked --quiet --profile "$profile" -p flowgate --bin flowgate --bin flowgate-gen
fi

# Man pages and completions, where cargo-deb looks for `target/release/packaging/...` (its name
# for the profile's output directory). Generated afresh every time, never committed.
gen="$out_dir/packaging"
rm -rf "$gen"
"$out_dir/flowgate-gen" "$gen" >/dev/null
# Compressed as Debian wants man pages; -n keeps the name and time out of the gzip header.
gzip -9n "$gen"/man/*.1

echo "== cargo deb ($profile)"
args=(--no-build --locked -p flowgate)
if [[ $profile == dev ]]; then
    # cargo-deb warns that it is meant for release builds; the dev package is for tests only.
    args+=(--profile dev)
fi
if [[ -n $output ]]; then
    mkdir -p "$output"
    args+=(--output "$output")
fi
cargo deb "${args[@]}"
