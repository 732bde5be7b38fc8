#!/usr/bin/env bash
# Offline check of the runtime flakes: every .nix file parses, and every runtime flake evaluates,
# through the real flake machinery, with nixpkgs overridden by nix/stub-nixpkgs/. Nothing is built
# (building needs nixpkgs from the network: see nix/README.md).
#
#   nix/check.sh [NIX_DIR]      NIX_DIR defaults to this script's directory (the repo's nix/)
#
# Prints one line per check ("ok ..." or "FAIL ..."), exits 1 if any failed, 2 if nix-bin is
# missing and cannot be installed (not root). Installs Debian's nix-bin when run as root.
#
# Works with Debian bookworm's nix 2.8: the tree is packed into a tarball and evaluated as
# file://…tar.gz?dir=runtimes/<name> (2.8's path: flakes take no `dir`, and git+file: would
# see only committed or staged files), into a throw-away store under a temporary directory
# (--store local?root=…), so it needs neither a writable /nix nor root once nix is installed.
set -u

nix_dir=$(cd "${1:-$(dirname "$0")}" && pwd) || { echo "FAIL no such directory: ${1:-}"; exit 1; }

if ! command -v nix-instantiate >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "nix/check.sh: nix-bin is not installed and installing it needs root (apt-get install nix-bin)" >&2
    exit 2
  fi
  echo "nix/check.sh: installing nix-bin (Debian)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q nix-bin >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q nix-bin >/dev/null; } \
    || { echo "FAIL install nix-bin (apt-get)"; exit 2; }
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/atrun-nix-check.XXXXXX")
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
export XDG_CACHE_HOME="$work/cache"   # nix's fetcher and eval caches: per run, never stale
nix_flags=(--extra-experimental-features 'nix-command flakes' --store "local?root=$work/store")

systems=(x86_64-linux aarch64-linux)
outputs=(packages.SYSTEM.at-run-exec packages.SYSTEM.image packages.SYSTEM.rootfs
         packages.SYSTEM.default checks.SYSTEM.selftest)

checks=0
failed=0
ok() { checks=$((checks + 1)); printf 'ok    %s\n' "$*"; }
fail() {  # fail DESCRIPTION ERROR-FILE
  checks=$((checks + 1)); failed=$((failed + 1))
  printf 'FAIL  %s\n' "$1"
  grep -v -e '^warning: not writing modified lock file' -e "^• Added input 'nixpkgs'" \
    -e "^    'path:" -e '^evaluating flake' -e '^(use .--show-trace' "$2" | sed -n '1,8s/^/      /p'
}

# (a) every .nix file parses
while IFS= read -r -d '' file; do
  rel=${file#"$nix_dir"/}
  if nix-instantiate --store "local?root=$work/store" --parse "$file" >/dev/null 2>"$work/err"; then
    ok "parse  $rel"
  else
    fail "parse  $rel" "$work/err"
  fi
done < <(find "$nix_dir" -name '*.nix' -type f -print0 | sort -z)

# (b) every runtime flake evaluates against the stub
tarball="$work/nix.tar.gz"
# One top-level directory, as nix wants of a tarball flake.
tar -C "$(dirname "$nix_dir")" -czf "$tarball" --exclude=__pycache__ --exclude='*.pyc' --exclude=result \
  "$(basename "$nix_dir")" \
  || { echo "FAIL pack $nix_dir"; exit 1; }
stub="path:$nix_dir/stub-nixpkgs"
eval_flags=(--no-write-lock-file --no-eval-cache --tarball-ttl 0 --override-input nixpkgs "$stub")

runtimes=()
for flake in "$nix_dir"/runtimes/*/flake.nix; do
  [ -e "$flake" ] && runtimes+=("$(basename "$(dirname "$flake")")")
done
[ ${#runtimes[@]} -gt 0 ] || { fail "flakes: none under $nix_dir/runtimes/*/flake.nix" /dev/null; }

for rt in "${runtimes[@]}"; do
  ref="file://$tarball?dir=runtimes/$rt"

  # The real input, which the stub replaces here.
  if url=$(nix "${nix_flags[@]}" eval --raw --file "$nix_dir/runtimes/$rt/flake.nix" inputs.nixpkgs.url 2>"$work/err") \
     && [[ $url == github:NixOS/nixpkgs/* ]]; then
    ok "input  $rt  nixpkgs = $url"
  else
    echo "inputs.nixpkgs.url is '${url:-}', expected github:NixOS/nixpkgs/<branch>" >>"$work/err"
    fail "input  $rt  nixpkgs" "$work/err"
  fi

  # The flake schema (outputs are derivations where they must be), every system.
  if nix "${nix_flags[@]}" flake check --no-build "${eval_flags[@]}" "$ref" 2>"$work/err"; then
    ok "flake  $rt  nix flake check --no-build"
  else
    fail "flake  $rt  nix flake check --no-build" "$work/err"
  fi

  for system in "${systems[@]}"; do
    for out in "${outputs[@]}"; do
      attr=${out/SYSTEM/$system}
      if drv=$(nix "${nix_flags[@]}" eval --raw "${eval_flags[@]}" "$ref#$attr.drvPath" 2>"$work/err") \
         && [[ $drv == /nix/store/*.drv ]]; then
        ok "eval   $rt  $attr  ${drv#/nix/store/}"
      else
        fail "eval   $rt  $attr" "$work/err"
      fi
    done
  done

  # What bin/at-run-exec runs: runtime.json's command with store paths (the script's exec line).
  if text=$(nix "${nix_flags[@]}" eval --raw "${eval_flags[@]}" "$ref#packages.${systems[0]}.at-run-exec.text" 2>"$work/err") \
     && cmd=$(printf '%s\n' "$text" | grep -m1 '^exec '); then
    ok "cmd    $rt  $cmd"
  else
    fail "cmd    $rt  packages.${systems[0]}.at-run-exec.text has no exec line" "$work/err"
  fi
done

echo "nix/check.sh: $checks checks, $failed failed"
[ "$failed" -eq 0 ]
