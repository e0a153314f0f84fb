#!/usr/bin/env bash
# Builds the Go client into clients/go/bin/layerline-go-client.
#
# Generates the Go stubs of protos/coordinator.proto with protoc, protoc-gen-go and
# protoc-gen-go-grpc into a GOPATH tree (clients/go/gen/src/layerline/v1, not
# committed), then builds in GOPATH mode against the Go libraries Debian installs
# under /usr/share/gocode (clients/install.sh installs them). Safe to rerun.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
gocode="${GOCODE:-/usr/share/gocode}"   # the Debian packages' GOPATH
gen="$here/gen"

for tool in go protoc protoc-gen-go protoc-gen-go-grpc; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build.sh: $tool not found; run clients/install.sh" >&2
        exit 1
    fi
done
# grpc-go's Debian package accepts either golang-github-golang-protobuf 1.3 or 1.5 at
# that path; only 1.5 (built on google.golang.org/protobuf) works with stubs that
# protoc-gen-go 1.2x writes: with 1.3 the client panics at start.
if ! grep -q 'google.golang.org/protobuf' "$gocode/src/github.com/golang/protobuf/proto/proto.go" 2>/dev/null; then
    echo "build.sh: $gocode/src/github.com/golang/protobuf is not version 1.5;" \
         "install golang-github-golang-protobuf-1-5-dev (clients/install.sh does)" >&2
    exit 1
fi

# Stubs into $gen/src/layerline/v1, import path "layerline/v1". The M options pin
# that import path here rather than trusting the go_package in the .proto.
rm -rf "$gen/src/layerline"
mkdir -p "$gen/src"
go_package="layerline/v1;layerlinev1"
protoc -I "$repo/protos" \
    --go_out="$gen/src" --go_opt=paths=import --go_opt="Mcoordinator.proto=$go_package" \
    --go-grpc_out="$gen/src" --go-grpc_opt=paths=import --go-grpc_opt="Mcoordinator.proto=$go_package" \
    "$repo/protos/coordinator.proto"

cache="$(go env GOCACHE 2>/dev/null || true)"
if [ -z "$cache" ] || [ "$cache" = off ]; then
    export GOCACHE="$gen/go-build"
fi

mkdir -p "$here/bin"
cd "$here"
# CGO off: a static binary, and no C compiler needed.
CGO_ENABLED="${CGO_ENABLED:-0}" GOPATH="$gen:$gocode" GO111MODULE=off GOFLAGS= go build -o bin/layerline-go-client .
echo "built $here/bin/layerline-go-client"
