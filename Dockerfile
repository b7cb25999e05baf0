# A kre-runner node image for CPU handlers. Build from the repository root:
#   docker build -t kre-runner .
# Your handler goes in a derived image (deploy/docker/handler.Dockerfile):
#   FROM kre-runner / COPY --chown=kre:kre handler/ /krt-files/ / RUN pip install -r /krt-files/requirements.txt
# The virtualenv /opt/kre belongs to the non-root user kre, so that `pip install` works as that user.
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/kre \
    PATH=/opt/kre/bin:$PATH \
    KRT_BASE_PATH=/krt-files

# tini: PID 1 that forwards SIGTERM, so in-flight messages finish within KRT_SHUTDOWN_GRACE.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --user-group kre \
    && mkdir -p /opt/kre /krt-files \
    && chown kre:kre /opt/kre /krt-files

# Numeric, so that Kubernetes can check runAsNonRoot.
USER 1000:1000
COPY --chown=kre:kre pyproject.toml README.md LICENSE /tmp/kre-src/
COPY --chown=kre:kre src /tmp/kre-src/src
# The steps below run as kre; tests/test_deploy.py runs them as a non-root user in CI (no Docker there).
RUN python -m venv /opt/kre \
    && pip install --no-cache-dir /tmp/kre-src \
    && rm -rf /tmp/kre-src

WORKDIR /krt-files
EXPOSE 8080
ENTRYPOINT ["tini", "--", "kre-runner"]
CMD ["run"]
