# The two set-up commands of the README. Each installs what it needs, then runs.
PYTHON ?= python3

.PHONY: demo test install install-test browser

install:
	$(PYTHON) -m pip install -q -e .

install-test:
	$(PYTHON) -m pip install -q -e '.[test]'

# Main job: the whole pipeline on the embedded synthetic shapes world.
demo: install
	glied demo --out glied-demo

# Tests: install what they need, then the default (not slow) suite.
test: install-test browser
	$(PYTHON) -m pytest -q

# Headless Chromium for the `glied serve` browser test: Debian's chromium + chromium-driver, installed when
# running as root with apt-get; otherwise that one test is skipped with the reason.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "make: could not install chromium; the browser test will be skipped"; \
	else echo "make: chromium is not installed (not root); the browser test will be skipped"; fi
