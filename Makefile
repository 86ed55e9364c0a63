# Everything the project needs installs from here. Two entry points (see README):
#   make demo   headless end-to-end run of the pack in ComfyUI on tiny random-weight models
#   make test   the test suite (unit + diffusers tiers; comfyui tier when ComfyUI is found)

PYTHON ?= python3
VENV ?= .venv
# CPU torch for the test venv; users with a GPU run `make test TORCH_SPEC=torch` in their own env.
TORCH_SPEC ?= torch==2.13.0
# ComfyUI imports torchvision, which must match torch: this pair installs together.
COMFY_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
COMFY_VENV ?= .venv-comfy
PYTEST_ARGS ?=

.PHONY: test demo venv comfy-env screenshots clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# With COMFYUI_PATH set, the tests run in the ComfyUI venv (torchvision and ComfyUI's own
# requirements), so the comfyui tier runs too; without it, in the CPU-torch venv.
ifdef COMFYUI_PATH
test: comfy-env
	$(COMFY_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)
else
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)
endif

# ComfyUI's own requirements.txt is installed by scripts/main_job.py once ComfyUI is found
# (or installed with comfy-cli): its frontend/template pins must match that ComfyUI.
$(COMFY_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(COMFY_VENV)
	$(COMFY_VENV)/bin/pip install -q --upgrade pip
	$(COMFY_VENV)/bin/pip install -q $(COMFY_TORCH_SPEC)
	$(COMFY_VENV)/bin/pip install -q -e ".[test,setup]"
	touch $@

comfy-env: $(COMFY_VENV)/.installed
	$(COMFY_VENV)/bin/python scripts/main_job.py --setup-only

demo: $(COMFY_VENV)/.installed
	$(COMFY_VENV)/bin/python scripts/main_job.py

# Regenerates docs/screenshots/ from the browser test (needs ComfyUI, Chromium and Playwright).
screenshots: comfy-env
	PARA_ATTN_UPDATE_SCREENSHOTS=1 $(COMFY_VENV)/bin/python -m pytest -q tests/test_browser.py

clean:
	rm -rf $(VENV) $(COMFY_VENV) .pytest_cache
