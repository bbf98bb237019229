# Two commands for a newcomer on Debian with Python 3.11: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
APT_PACKAGES = orthanc orthanc-dicomweb dicom3tools dcmtk chromium chromium-driver s3fs postgresql
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
RUN_PORT ?= 11112

.PHONY: run test venv test-deps sample lint bench clean

# The first install fills about 6.4 GB (`du -sh .venv`; torch and its CUDA libraries take
# 4.4 GB of it): pip shows each package and a progress bar.
$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	@echo "installing the Python packages into $(VENV) (about 6.4 GB; minutes on a first run)"
	@free=$$(df -Pk $(VENV) | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$free" -lt 8 ]; then echo "warning: only $$free GB free where $(VENV) lies; the install needs about 7 GB" >&2; fi
	$(BIN)/pip install --progress-bar on --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

venv: $(BIN)/.installed

# Debian packages the tests use: a real PACS (Orthanc), dciodvfy (dicom3tools), storescu (dcmtk),
# a real browser for the console test (chromium, chromium-driver), s3fs (a real FUSE cloud
# mount over a local S3 server).
test-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Sample input built from the DICOM files pydicom ships (two gateways, image.db each).
sample: venv
	$(BIN)/python -m devtools.sample INPUT

# Runs the service on the sample, sending to the embedded development receiver.
run: venv sample
	@mkdir -p STATE OUTPUT
	@$(BIN)/python main.py receiver --port $(RUN_PORT) --dir STATE/received & echo $$! > STATE/receiver.pid
	@trap 'kill $$(cat STATE/receiver.pid) 2>/dev/null' EXIT INT TERM; \
	GATEWAY_PACS_HOST=127.0.0.1 GATEWAY_PACS_PORT=$(RUN_PORT) GATEWAY_PACS_AE_TITLE=DEVRECEIVER \
	$(BIN)/python main.py serve --config config/sample.toml

test: venv test-deps lint
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check service devtools tests bench main.py
	$(BIN)/ruff format --check service devtools tests bench main.py
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf STATE OUTPUT/gateway_* INPUT/gateway_*
