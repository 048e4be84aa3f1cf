# The two set-up commands of the README. Each installs what it needs, then runs.
PYTHON ?= python3

.PHONY: demo test install install-test

install:
	$(PYTHON) -m pip install -q -e .

install-test:
	$(PYTHON) -m pip install -q -e '.[test]'

# Main job: the whole pipeline on the embedded synthetic shapes world.
demo: install
	glied demo --out glied-demo

# Tests: install what they need, then the default (not slow) suite.
test: install-test
	$(PYTHON) -m pytest -q
