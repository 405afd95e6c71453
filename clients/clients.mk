# Clients in other languages, generated from protos/fabric/v1. The TypeScript and Go stubs come from one
# `buf generate` (clients/buf.gen.yaml) and are committed (clients/typescript/src/gen, clients/go/gen) so a consumer
# needs no toolchain to read them; `make clients` checks that a fresh generation equals them, then builds every
# client. The C++ stubs are not committed: CMake generates them at build time (clients/cpp/CMakeLists.txt runs
# protoc + grpc_cpp_plugin into clients/cpp/build/gen), so they always match the installed protobuf and gRPC.
#
#   make clients            toolchains (apt + npm, only what is missing) + generation check + build all
#   make clients-generate   regenerate the TypeScript and Go stubs in place after a proto change (then commit them)
#   make test-clients       the interop tests: each client's example against real Python servers

.PHONY: clients clients-apt clients-toolchains clients-generate clients-check clients-build \
        clients-build-typescript clients-build-cpp clients-build-go test-clients

CLIENTS_SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian bookworm packages: C++ (grpc++ 1.51, protobuf 3.21) and Go (go 1.19, grpc-go 1.33, protobuf-go 1.28).
# golang-github-golang-protobuf-1-5-dev replaces the 1.3 APIv1 package that grpc-go would otherwise pull in:
# with 1.3, grpc-go's codec panics on the APIv2 messages protoc-gen-go generates.
CLIENTS_APT := cmake g++ make pkg-config protobuf-compiler libprotobuf-dev libgrpc++-dev protobuf-compiler-grpc \
               golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev \
               protoc-gen-go protoc-gen-go-grpc
CLIENTS_GEN_DIRS := clients/typescript/src/gen clients/go/gen
# Parallel jobs of the C++ build (e.g. `make clients CLIENTS_JOBS=1` on a busy machine).
CLIENTS_JOBS ?= $(shell nproc)
CLIENTS_TS := clients/typescript
CLIENTS_GO_BUILD := $(CURDIR)/clients/go/build
# grpc-go from Debian is a GOPATH tree (/usr/share/gocode), not a module proxy: build in GOPATH mode, with the
# client's import path `fabric/clients/go` linked into a private GOPATH.
CLIENTS_GO_ENV := GO111MODULE=off GOFLAGS= GOPATH=$(CLIENTS_GO_BUILD)/gopath:/usr/share/gocode

clients: clients-check clients-build

clients-toolchains: setup clients-apt $(CLIENTS_TS)/node_modules/.installed-stamp

# The system toolchains (C++, Go, protoc) alone: the builds need no Python, so CI builds them while the venv installs.
clients-apt:
	@missing=$$(for p in $(CLIENTS_APT); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "clients: installing $$missing"; \
	  $(CLIENTS_SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(CLIENTS_SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

# Node 20+ and npm: kept when present (e.g. NodeSource), else Debian's.
$(CLIENTS_TS)/node_modules/.installed-stamp: $(CLIENTS_TS)/package-lock.json
	@command -v npm >/dev/null || { $(CLIENTS_SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(CLIENTS_SUDO) apt-get install -y -q nodejs npm; }
	cd $(CLIENTS_TS) && npm ci --no-audit --no-fund
	touch $@

clients-generate: clients-toolchains
	$(BIN)/buf generate protos --template clients/buf.gen.yaml

# A fresh generation into a scratch folder must equal what is committed.
clients-check: clients-toolchains
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(BIN)/buf generate protos --template clients/buf.gen.yaml -o "$$tmp" && \
	for d in $(CLIENTS_GEN_DIRS); do \
	  diff -r "$$tmp/$$d" "$$d" >/dev/null || { echo "clients: $$d is stale: run \`make clients-generate\` and commit"; exit 1; }; \
	done && echo "clients: generated code is current"

clients-build: clients-build-typescript clients-build-cpp clients-build-go

clients-build-typescript: clients-apt $(CLIENTS_TS)/node_modules/.installed-stamp
	cd $(CLIENTS_TS) && npm run -s build

clients-build-cpp: clients-apt
	cmake -S clients/cpp -B clients/cpp/build -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build clients/cpp/build -j$(CLIENTS_JOBS)

clients-build-go: clients-apt
	mkdir -p $(CLIENTS_GO_BUILD)/gopath/src/fabric/clients
	ln -sfn $(CURDIR)/clients/go $(CLIENTS_GO_BUILD)/gopath/src/fabric/clients/go
	cd $(CLIENTS_GO_BUILD)/gopath/src/fabric/clients/go && $(CLIENTS_GO_ENV) go vet ./fabric ./cmd/... && \
	  $(CLIENTS_GO_ENV) go build -o $(CLIENTS_GO_BUILD)/fabric-example ./cmd/fabric-example

test-clients: clients
	$(BIN)/python -m pytest -q tests/clients
