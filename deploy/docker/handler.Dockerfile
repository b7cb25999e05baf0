# Your node's image: kre-runner plus your handler directory and its packages, baked in at build time.
# From a directory holding handler/ (handler.py, its *_pb2.py, requirements.txt, model files):
#   docker build -f handler.Dockerfile --build-arg BASE=kre-runner:0.1.0 -t my-node:1 .
# For a GPU handler: --build-arg BASE=kre-runner-cuda:0.1.0
ARG BASE=kre-runner:0.1.0
FROM ${BASE}

# The base image runs as the non-root user kre, owner of the virtualenv /opt/kre (on PATH):
# pip installs into it without root.
COPY --chown=kre:kre handler/ /krt-files/
RUN pip install --no-cache-dir -r /krt-files/requirements.txt

ENV KRT_HANDLER_PATH=handler.py
