# Clients in other languages, generated from protos/fabric/v1 by one `buf generate` (clients/buf.gen.yaml).
# Generated code is committed (clients/*/gen, clients/typescript/src/gen) so a consumer needs no toolchain to
# read it; `make clients` checks that a fresh generation equals it, then builds every client.
#
#   make clients            toolchains (apt + npm, only what is missing) + generation check + build all
#   make clients-generate   regenerate in place after a proto change (then commit the result)
#   make test-clients       the interop tests: each client's example against real Python servers

.PHONY: clients clients-toolchains clients-generate clients-check clients-build \
        clients-build-typescript clients-build-cpp clients-build-go test-clients

CLIENTS_SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian bookworm packages: C++ (grpc++ 1.51, protobuf 3.21) and Go (go 1.19, grpc-go 1.33, protobuf-go 1.28).
# golang-github-golang-protobuf-1-5-dev replaces the 1.3 APIv1 package that grpc-go would otherwise pull in:
# with 1.3, grpc-go's codec panics on the APIv2 messages protoc-gen-go generates.
CLIENTS_APT := cmake g++ make pkg-config protobuf-compiler libprotobuf-dev libgrpc++-dev protobuf-compiler-grpc \
               golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev \
               protoc-gen-go protoc-gen-go-grpc
CLIENTS_GEN_DIRS := clients/typescript/src/gen clients/cpp/gen clients/go/gen
CLIENTS_TS := clients/typescript
CLIENTS_GO_BUILD := $(CURDIR)/clients/go/build
# grpc-go from Debian is a GOPATH tree (/usr/share/gocode), not a module proxy: build in GOPATH mode, with the
# client's import path `fabric/clients/go` linked into a private GOPATH.
CLIENTS_GO_ENV := GO111MODULE=off GOFLAGS= GOPATH=$(CLIENTS_GO_BUILD)/gopath:/usr/share/gocode

clients: clients-check clients-build

clients-toolchains: setup $(CLIENTS_TS)/node_modules/.installed-stamp
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

clients-build-typescript: clients-toolchains
	cd $(CLIENTS_TS) && npm run -s build

clients-build-cpp: clients-toolchains
	cmake -S clients/cpp -B clients/cpp/build -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build clients/cpp/build -j$$(nproc)

clients-build-go: clients-toolchains
	mkdir -p $(CLIENTS_GO_BUILD)/gopath/src/fabric/clients
	ln -sfn $(CURDIR)/clients/go $(CLIENTS_GO_BUILD)/gopath/src/fabric/clients/go
	cd $(CLIENTS_GO_BUILD)/gopath/src/fabric/clients/go && $(CLIENTS_GO_ENV) go vet ./fabric ./cmd/... && \
	  $(CLIENTS_GO_ENV) go build -o $(CLIENTS_GO_BUILD)/fabric-example ./cmd/fabric-example

test-clients: clients
	$(BIN)/python -m pytest -q tests/clients
