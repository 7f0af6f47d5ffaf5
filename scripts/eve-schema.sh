#!/usr/bin/env bash
# Prints the path of Suricata's EVE JSON schema (etc/schema.json of Suricata's source), which the
# event-format tests validate flowgate's EVE records against. It is not part of this repository
# (it is Suricata's, GPL-2.0): the first call fetches Debian's source package of Suricata 8
# (unstable; the Debian 13 source leaves the schema out) through apt with a private, throwaway
# configuration, keeps only the schema under target/schemas/, and later calls print that path.
# Nothing of the host's apt configuration changes. Exits non-zero with a message when the schema
# cannot be had.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/schemas/suricata-eve.schema.json
if [[ -s $out ]]; then
    echo "$PWD/$out"
    exit 0
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/flowgate-eve-schema.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/src"
echo "deb-src http://deb.debian.org/debian sid main" >"$work/sources.list"
apt=(apt-get -q -o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=-"
    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "APT::Sandbox::User=root")
"${apt[@]}" update >"$work/update.log" 2>&1 || { cat "$work/update.log" >&2; echo "eve-schema.sh: apt-get update of Debian's sid sources failed" >&2; exit 1; }
# Only the upstream tarball is needed; the mirror here may lack the Debian packaging files, so
# apt-get's own verdict does not matter, the tarball's presence does.
(cd "$work/src" && "${apt[@]}" source --download-only suricata >"$work/source.log" 2>&1) || true
tarball=$(ls "$work"/src/suricata_*.orig.tar.gz 2>/dev/null | head -1 || true)
[[ -n $tarball ]] || { cat "$work/source.log" >&2; echo "eve-schema.sh: apt-get source suricata brought no upstream tarball" >&2; exit 1; }
member=$(tar -tzf "$tarball" | grep -E '^[^/]+/etc/schema\.json$' | head -1)
[[ -n $member ]] || { echo "eve-schema.sh: $tarball has no etc/schema.json" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
tar -xzOf "$tarball" "$member" >"$out.tmp"
mv "$out.tmp" "$out"
echo "eve-schema.sh: $(basename "$tarball"): $member, sha256 $(sha256sum "$out" | cut -d' ' -f1)" >&2
echo "$PWD/$out"
