#!/bin/sh
# SPDX-License-Identifier: MIT OR GPL-2.0-only
#
# Rebuilds owner.bpf.o from owner.bpf.c: ./build.sh [output] (default: owner.bpf.o here).
# Needs clang-14, llvm-strip-14 and libbpf's headers (Debian: clang-14 llvm-14 libbpf-dev
# linux-libc-dev). The output is byte-for-byte reproducible: compiled from this directory with
# relative paths, DWARF stripped (the BTF that CO-RE needs stays).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/owner.bpf.o"}
case $out in /*) ;; *) out="$(pwd)/$out" ;; esac
arch=$(uname -m | sed -e 's/x86_64/x86_64-linux-gnu/' -e 's/aarch64/aarch64-linux-gnu/')
cd "$here"
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
clang-14 -O2 -g -target bpf -mcpu=v3 \
	-I/usr/include/"$arch" \
	-fdebug-prefix-map="$here"=. -fno-ident \
	-c owner.bpf.c -o "$tmp"
llvm-strip-14 -g "$tmp"
mv "$tmp" "$out"
