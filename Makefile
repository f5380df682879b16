# ringmover: the two set-up commands README.md gives.
#   make demo  - build, then show the main job end to end on defaults
#   make test  - format check, clippy -D warnings, every test (all backends)
# and the portability checks:
#   make portable - clippy -D warnings for FreeBSD and macOS (compile only)
#   make msrv     - the library and CLI build with Cargo.toml's rust-version
SHELL := /bin/bash
CARGO ?= cargo
BIN := target/release/ringmover

# Non-Linux Unix targets `make portable` checks. Compile only: there is no
# linker or machine for them here, so clippy, not test.
PORTABLE_TARGETS := x86_64-unknown-freebsd x86_64-apple-darwin

# The declared minimum Rust version, read from Cargo.toml.
MSRV := $(shell sed -n 's/^rust-version = "\(.*\)"$$/\1/p' Cargo.toml)

.PHONY: bench-tokio lint-tokio all build man demo test deps fmt lint portable portable-targets portable-check print-portable-targets msrv print-msrv bench clean

all: build

build:
	$(CARGO) build --release --bins

# ringmover against the glueing tokio writer issues 9 and 10 measure it
# against, side by side in one run (needs the tokio-baseline feature).
bench-tokio:
	$(CARGO) run --release --features tokio-baseline -- bench gather \
	  --conns 1000 --shape small,srs --strategy tokio-glue,glue,uring,epoll

# The man page (every subcommand in one roff document).
man: build
	mkdir -p target/man
	$(BIN) man > target/man/ringmover.1
	@echo "wrote target/man/ringmover.1 (man -l target/man/ringmover.1)"

demo: build
	@echo "== ringmover probe: what this kernel supports and which backend we get"
	$(BIN) probe
	@echo
	@echo "== required opcodes for zero-copy receive and send"
	$(BIN) probe --require send_zc,splice
	@echo
	@echo "== recv + send end to end on every backend: 256 MiB over loopback, SHA-256 checked"
	@set -euo pipefail; work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; \
	head -c 268435456 /dev/urandom > "$$work/src.bin"; \
	want=$$(sha256sum < "$$work/src.bin" | cut -d' ' -f1); \
	for b in uring epoll poll; do \
	  mkdir "$$work/in-$$b"; \
	  RINGMOVER_BACKEND=$$b $(BIN) recv --listen 127.0.0.1:0 --out "$$work/in-$$b" --max-conns 1 --json \
	    > "$$work/recv-$$b.json" 2> "$$work/recv-$$b.err" & rpid=$$!; \
	  for i in $$(seq 100); do grep -q '^listening on' "$$work/recv-$$b.err" && break; sleep 0.05; done; \
	  addr=$$(sed -n 's/^listening on //p' "$$work/recv-$$b.err" | head -n1); \
	  RINGMOVER_BACKEND=$$b $(BIN) send "$$work/src.bin" --to "$$addr" --json > "$$work/send-$$b.json"; \
	  wait $$rpid; \
	  got=$$(sha256sum "$$work/in-$$b"/* | cut -d' ' -f1); \
	  [ "$$got" = "$$want" ] || { echo "$$b: SHA-256 mismatch" >&2; exit 1; }; \
	  printf '%-6s sha256 ok  %s\n' "$$b" "$$(cat "$$work/recv-$$b.json")"; \
	done
	@echo
	@echo "== streaming sends: every connection kept 64 KiB deep, every strategy side by side"
	$(BIN) bench gather --seconds 0.3 --conns 1,100 --shape small,srs
	@echo
	@echo "== fan-out of one 1 MiB buffer through the broadcast API vs a copy per connection"
	$(BIN) bench fanout --seconds 0.3 --conns 1,100
	@echo
	@echo "== the library examples: streaming with back-pressure, broadcast on every core"
	$(CARGO) run --release --example stream
	$(CARGO) run --release --example broadcast

# The recv tests drive real clients (nc, socat) and count fsyncs with
# strace: install them on a fresh
# Debian machine, fail clearly elsewhere.
deps:
	@missing=""; for t in nc socat strace; do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing netcat-openbsd socat strace (missing:$$missing)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq netcat-openbsd socat strace; \
	  else \
	    echo "make test needs:$$missing (Debian: apt-get install netcat-openbsd socat strace)" >&2; exit 1; \
	  fi; \
	fi

fmt:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --all-targets -- -D warnings
	# the API docs are the manual: every intra-doc link must resolve
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --lib

# The tokio baseline of `bench gather` (off by default) must not rot:
# .ci/run runs this after `make test` (tokio's build would cost make test
# half a minute of its three).
lint-tokio:
	$(CARGO) clippy --bins --features tokio-baseline -- -D warnings

test: deps fmt lint
	# every example builds first: the suite runs them (tests/suite/examples.rs)
	$(CARGO) build --examples
	# --all-targets also runs each criterion bench once, so they never rot
	$(CARGO) test --all-targets
	# doctests, README.md's example among them (--all-targets skips them)
	$(CARGO) test --doc
	# a library user (no default features) compiles no CLI crate
	$(CARGO) check --lib --no-default-features
	@if $(CARGO) tree -e normal --no-default-features --prefix none | grep -E '^(clap|clap_complete|clap_mangen|anyhow|serde|serde_json|indicatif) '; then \
	  echo "the library without the cli feature depends on the CLI crates above" >&2; exit 1; \
	fi

# rustup fetches each target's std from its server. .ci/run adds only the
# missing ones, checks those already installed whatever happens, and skips
# (with a banner) those it cannot add.
portable-targets:
	rustup target add $(PORTABLE_TARGETS)

portable: portable-targets portable-check

portable-check:
	@set -e; for t in $(PORTABLE_TARGETS); do \
	  echo "== cargo clippy --all-targets --target $$t"; \
	  $(CARGO) clippy --all-targets --target $$t -- -D warnings; \
	done

print-portable-targets:
	@echo $(PORTABLE_TARGETS)

# Tests and benches are not held to it (proptest needs a newer Rust).
msrv:
	$(CARGO) +$(MSRV) check --lib --bins --locked

print-msrv:
	@echo $(MSRV)

bench:
	$(CARGO) bench

clean:
	$(CARGO) clean
