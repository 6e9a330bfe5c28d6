# One image for every lambda-pipeline service; the Helm chart picks the service by module:
#   docker run IMAGE services.generator   ->   python -m services.generator
# The `local` extra (embedded Kafka/PostgreSQL/S3/Snowflake stand-ins) is deliberately not installed.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
# Dependencies first, so editing the code does not reinstall them.
COPY pyproject.toml constraints.txt README.md ./
COPY services ./services
RUN /opt/venv/bin/pip install -c constraints.txt .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    LP_REPO_ROOT=/app
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The contracts and declarations the services and the declarations library read at run time (services.kit.paths).
COPY schemas ./schemas
COPY deploy/k8s ./deploy/k8s
COPY deploy/debezium ./deploy/debezium
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["python", "-m"]
CMD ["services.generator"]
