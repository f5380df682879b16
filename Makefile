# ringmover: the two set-up commands README.md gives.
#   make demo  - build, then show the main job end to end on defaults
#   make test  - format check, clippy -D warnings, every test (all backends)
CARGO ?= cargo
BIN := target/release/ringmover

.PHONY: all build demo test fmt lint bench clean

all: build

build:
	$(CARGO) build --release --bins

demo: build
	@echo "== ringmover probe: what this kernel supports and which backend we get"
	$(BIN) probe
	@echo
	@echo "== the same host as a container whose seccomp policy forbids io_uring would see it"
	RINGMOVER_BACKEND=epoll $(BIN) probe | tail -n 1
	@echo
	@echo "== required opcodes for zero-copy receive and send"
	$(BIN) probe --require send_zc,splice

fmt:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --all-targets -- -D warnings

test: fmt lint
	# --all-targets also runs each criterion bench once, so they never rot
	$(CARGO) test --all-targets

bench:
	$(CARGO) bench

clean:
	$(CARGO) clean
